"""How the ModelRunner turns a step's logits into token ids and confidences, on the device.

Greedy rows of one policy are sampled in one call (the fused Triton kernel on CUDA, the torch reference
elsewhere), tempered rows through the fused temperature kernel when it can take them, and the rest (CFG,
top-k/top-p, ...) one sequence at a time; one device-to-host copy brings ids, confidences and NaN flags
back. Tensor parallel, only rank 0 runs this, over the logits gathered from every rank.
"""

from __future__ import annotations

import numpy as np
import torch

from diffulex.config import EngineConfig
from diffulex.sampling.confidence import sample_tokens
from diffulex.step import SampleSpec, SequenceOutput, StepOutput, StepPlan, step_seed


class StepSampling:
    """The sampling half of ``ModelRunner`` (a mixin: it reads the runner's ``config``)."""

    config: EngineConfig

    def _sample(self, plan: StepPlan, logits: torch.Tensor, mask_token_id: int) -> StepOutput:
        """Token ids and confidences for every sampled row; one device→host copy of each."""
        cu = plan.cu_samples
        num_rows = cu[-1]
        uncond = set(plan.cfg_pairs.values())
        token_ids = torch.zeros(num_rows, dtype=torch.long, device=logits.device)
        confidences = torch.zeros(num_rows, dtype=torch.float64, device=logits.device)
        # Sequences that sample alike (greedy, same policy, no CFG) are sampled in one call; so are the
        # tempered ones of one policy that the fused kernel can take (each row keeps its own seed).
        groups: dict[tuple, list[int]] = {}
        tempered: dict[str, list[int]] = {}
        singles: list[int] = []
        for index, seq in enumerate(plan.sequences):
            if index in uncond or cu[index + 1] == cu[index]:
                continue
            spec = seq.sample
            if spec.temperature == 0 and spec.policy != "random" and index not in plan.cfg_pairs:
                groups.setdefault((spec.policy, spec.softmax_dtype, spec.top_k, spec.top_p), []).append(index)
            elif index not in plan.cfg_pairs and self._fused(logits, spec, sampling=True):
                tempered.setdefault(spec.policy, []).append(index)
            else:
                singles.append(index)
        for members in groups.values():
            spec = plan.sequences[members[0]].sample
            if sum(cu[i + 1] - cu[i] for i in members) == num_rows:
                ids, conf = self._greedy(logits, spec, mask_token_id)  # the common case: every row
                token_ids.copy_(ids)
                confidences.copy_(conf)
                continue
            rows = torch.from_numpy(np.concatenate([np.arange(cu[i], cu[i + 1]) for i in members]))
            rows = rows.to(logits.device)
            ids, conf = self._greedy(logits[rows], spec, mask_token_id)
            token_ids[rows] = ids
            confidences[rows] = conf
        for policy, members in tempered.items():
            rows, ids, conf = self._sample_fused(plan, logits, members, policy, mask_token_id)
            token_ids[rows] = ids
            confidences[rows] = conf
        for index in singles:
            seq = plan.sequences[index]
            seq_logits = logits[cu[index] : cu[index + 1]]
            if index in plan.cfg_pairs:
                twin = plan.cfg_pairs[index]
                uncond_logits = logits[cu[twin] : cu[twin + 1]]
                seq_logits = uncond_logits + (seq.sample.cfg_scale + 1) * (seq_logits - uncond_logits)
            seed = step_seed(seq.sample.seed, seq.step_index)
            ids, conf = sample_tokens(seq_logits, seq.sample, mask_token_id, seed)
            token_ids[cu[index] : cu[index + 1]] = ids
            confidences[cu[index] : cu[index + 1]] = conf
        # One device→host copy for ids, confidences and the NaN flags (ids < 2**53 are exact in float64).
        bad = (
            torch.isnan(logits).any(dim=-1)
            if num_rows
            else torch.zeros(0, dtype=torch.bool, device=logits.device)
        )
        host = torch.stack([token_ids.double(), confidences, bad.double()]).cpu().numpy()
        ids_host = host[0].astype(np.int64)
        conf_host = host[1]
        bad_rows = host[2] > 0
        any_bad = bool(bad_rows.any())
        outputs: list[SequenceOutput] = []
        for index in range(len(plan.sequences)):
            low, high = cu[index], cu[index + 1]
            failed = any_bad and bool(bad_rows[low:high].any())
            if any_bad and index in plan.cfg_pairs:
                twin = plan.cfg_pairs[index]
                failed = failed or bool(bad_rows[cu[twin] : cu[twin + 1]].any())
            outputs.append(SequenceOutput(ids_host[low:high], conf_host[low:high], failed=failed))
        return StepOutput(outputs)

    def _greedy(
        self, logits: torch.Tensor, spec: SampleSpec, mask_token_id: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy top-1 and confidence: the fused Triton kernel on CUDA, the torch reference elsewhere."""
        if self._fused(logits, spec, sampling=False):
            from diffulex.kernels.sampling import greedy_confidence_triton

            return greedy_confidence_triton(logits, mask_token_id, spec.policy)
        return sample_tokens(logits, spec, mask_token_id)

    def _fused(self, logits: torch.Tensor, spec: SampleSpec, sampling: bool) -> bool:
        """Whether the fused Triton kernels take rows of ``spec`` (greedy, or tempered with ``sampling``):
        logits on CUDA, ``fused_sampling``, softmax in the logits' dtype, no top-k/top-p, a known policy."""
        if not (
            logits.is_cuda
            and self.config.fused_sampling
            and spec.softmax_dtype == "logits"
            and spec.top_k == 0
            and spec.top_p >= 1.0
        ):
            return False
        from diffulex.kernels.sampling import POLICIES, SAMPLE_POLICIES  # imports triton: CUDA only

        return spec.policy in (SAMPLE_POLICIES if sampling else POLICIES)

    def _sample_fused(
        self, plan: StepPlan, logits: torch.Tensor, members: list[int], policy: str, mask_token_id: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows, ids and confidences of the sequences ``members`` (one policy), sampled by the fused
        temperature kernel. Row j of a sequence draws from the noise stream (``step_seed`` of the
        sequence, j), so its draw does not depend on the batch (``diffulex.kernels.sampling``)."""
        from diffulex.kernels.sampling import sample_confidence_triton

        cu = plan.cu_samples
        specs = [plan.sequences[i].sample for i in members]
        counts = [cu[i + 1] - cu[i] for i in members]
        seeds = [step_seed(spec.seed, plan.sequences[i].step_index) for i, spec in zip(members, specs)]
        host_ints = np.stack(
            [
                np.concatenate([np.arange(cu[i], cu[i + 1]) for i in members]),  # rows of the logits
                np.repeat(np.array(seeds, dtype=np.int64), counts),
                np.concatenate([np.arange(count) for count in counts]),  # streams
            ]
        ).astype(np.int64)
        temps = np.repeat(np.array([spec.temperature for spec in specs], dtype=np.float32), counts)
        rows, row_seeds, streams = torch.from_numpy(host_ints).to(logits.device)
        temperatures = torch.from_numpy(temps).to(logits.device)
        # Members cover their rows in order, so all rows of the step means no gather (no logits copy).
        group_logits = logits if sum(counts) == logits.shape[0] else logits[rows]
        ids, conf = sample_confidence_triton(
            group_logits, mask_token_id, policy, temperatures, row_seeds, streams
        )
        return rows, ids, conf
