"""The block-diffusion unmasking rules on the device, batched over the sequences of one step.

``diffulex.sampling.selection`` applies the rules on the host, one request at a time. A device loop
(several denoise iterations per host sync, see ``SequencePlan.loop_counts``) has to apply the very same
rules between forwards without copying anything to the host, so this module restates them in batched
torch ops over a ``[sequences, rows]`` layout:

* **top-k** (``select_top_k``): the ``k`` highest confidences among the still-masked rows of a sequence,
  equal confidences by lower row first (a stable descending sort: the host's ``rank``);
* **threshold** (``select_above`` used by SDAR's dynamic remasking): every still-masked row whose
  confidence is strictly above the threshold, taken instead of the top-k when there are at least ``k``.

``k`` is clipped to the rows still masked, as the strategies clip it. Confidences are compared in
float64, as on the host (the runner hands the host float64 confidences).
"""

from __future__ import annotations

import torch

# Sequences of at most this many sampled rows take the one-kernel GPU step (its rank matrix is rows²).
MAX_KERNEL_ROWS = 256


class DeviceUnmasker:
    """Tracks which sampled rows of each sequence are still masked and picks the rows to accept.

    ``rows_per_seq[s]`` sampled rows belong to sequence ``s`` (flat, sequence after sequence);
    ``counts[k][s]`` is sequence ``s``'s unmask count at iteration ``k``; ``thresholds[s]`` its dynamic
    threshold or None (top-k only). Every row starts masked.
    """

    def __init__(
        self,
        rows_per_seq: list[int],
        counts: list[list[int]],
        thresholds: list[float | None],
        device: torch.device,
    ):
        num_seqs = len(rows_per_seq)
        self.num_rows = sum(rows_per_seq)
        width = max(rows_per_seq, default=0)
        # pad_index[s, j]: the flat row of sequence s's j-th sampled row; num_rows (a sentinel) past its end.
        pad_index = torch.full((num_seqs, width), self.num_rows, dtype=torch.long)
        starts = [0]  # sequence s owns the flat rows [starts[s], starts[s + 1])
        for seq, count in enumerate(rows_per_seq):
            pad_index[seq, :count] = torch.arange(starts[-1], starts[-1] + count)
            starts.append(starts[-1] + count)
        self.pad_index = pad_index.to(device)
        self.row_start = torch.tensor(starts, dtype=torch.int32).to(device)
        self.counts = torch.tensor(counts, dtype=torch.long).reshape(len(counts), num_seqs).to(device)
        self.thresholds = torch.tensor(
            [float("inf") if t is None else float(t) for t in thresholds], dtype=torch.float64
        ).to(device)
        self.dynamic = torch.tensor([t is not None for t in thresholds], dtype=torch.bool).to(device)
        self.positions = torch.arange(width, device=device)
        self.masked = torch.ones(self.num_rows + 1, dtype=torch.bool, device=device)
        self.masked[-1] = False  # the sentinel row is never a candidate
        self.width = width
        self.dynamic_flags = self.dynamic.to(torch.int8)

    def step(
        self,
        ids: torch.Tensor,
        confidences: torch.Tensor,
        iteration: int,
        tokens: torch.Tensor,
        token_rows: torch.Tensor,
        record: torch.Tensor,
    ) -> None:
        """One loop iteration after sampling: pick the rows to accept (``select``), write their ``ids``
        into ``tokens[token_rows]``, and fill ``record`` (float64 ``[4, rows]``: ids, confidences,
        accepted, NaN flags). On CUDA one Triton kernel does all of it (``diffulex.kernels.device_select``)."""
        if confidences.is_cuda and self.width <= MAX_KERNEL_ROWS and record.is_contiguous():
            self.step_triton(ids, confidences, iteration, tokens, token_rows, record)
            return
        accepted = self.select(confidences, iteration)
        tokens[token_rows] = torch.where(accepted, ids, tokens[token_rows])
        record.copy_(
            torch.stack(
                [ids.double(), confidences.double(), accepted.double(), torch.isnan(confidences).double()]
            )
        )

    def step_triton(
        self,
        ids: torch.Tensor,
        confidences: torch.Tensor,
        iteration: int,
        tokens: torch.Tensor,
        token_rows: torch.Tensor,
        record: torch.Tensor,
    ) -> None:
        """``step`` by the Triton kernel whatever the device (the CPU tests run it interpreted); ``record``
        must be contiguous and no sequence wider than ``MAX_KERNEL_ROWS``."""
        from diffulex.kernels.device_select import unmask_step_triton

        unmask_step_triton(
            ids,
            confidences.to(torch.float64),
            self.masked[: self.num_rows].view(torch.int8),
            self.row_start,
            self.counts[iteration],
            self.thresholds,
            self.dynamic_flags,
            tokens,
            token_rows,
            record,
            self.width,
        )

    def select(self, confidences: torch.Tensor, iteration: int) -> torch.Tensor:
        """Rows accepted at ``iteration`` (bool ``[num_rows]``); they stop being masked."""
        conf = torch.full((self.num_rows + 1,), float("-inf"), dtype=torch.float64, device=self.masked.device)
        conf[: self.num_rows] = confidences.to(torch.float64)
        conf = torch.where(self.masked, conf, float("-inf"))
        padded = conf[self.pad_index]  # [S, width]; -inf on rows no longer masked and on padding
        still = self.masked[self.pad_index]
        k = torch.minimum(self.counts[iteration], still.sum(dim=1))
        order = torch.sort(padded, dim=1, descending=True, stable=True).indices
        top_sorted = self.positions.unsqueeze(0) < k.unsqueeze(1)
        top = torch.zeros_like(top_sorted).scatter(1, order, top_sorted)
        above = still & (padded > self.thresholds.unsqueeze(1))
        use_above = self.dynamic & (above.sum(dim=1) >= k)
        chosen_padded = torch.where(use_above.unsqueeze(1), above, top) & still
        # A scatter, not boolean indexing: no host sync. Padding lands on the sentinel row (dropped).
        chosen = torch.zeros(self.num_rows + 1, dtype=torch.bool, device=self.masked.device)
        chosen.scatter_(0, self.pad_index.reshape(-1), chosen_padded.reshape(-1))
        # The sentinel may come back chosen: it is dropped below, and masked[-1] stays False under &=.
        # (Clearing it with `chosen[-1] = False` copied a host scalar: a sync every iteration.)
        self.masked &= ~chosen
        return chosen[: self.num_rows]
