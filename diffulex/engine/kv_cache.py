"""Paged KV-cache bookkeeping: a pool of pages, ref counts, prefix caching, free list. Pure Python.

The K/V tensors themselves belong to the ModelRunner; this manager only decides which page holds which
positions of which request. Full pages of committed tokens are registered under a hash chained over
all tokens before them (and an optional salt, 0 by default), so a later request with the same prefix adopts them
instead of recomputing. A page whose last user leaves keeps its hash and stays matchable until the
pool needs it back (least recently freed first).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

from diffulex.request import Request


@dataclass
class Page:
    """One page: its id, how many requests hold it, and its prefix hash once it is full and committed."""

    page_id: int
    ref_count: int = 0
    block_hash: int | None = None


class KVCacheManager:
    """Allocates pages to requests; shares full committed pages through a prefix hash chain."""

    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True):
        if num_pages <= 0:
            raise ValueError(f"the KV cache needs at least one page, got {num_pages}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pages = [Page(i) for i in range(num_pages)]
        self.free_ids: list[int] = list(range(num_pages - 1, -1, -1))  # pop() hands out page 0 first
        self.evictable: OrderedDict[int, None] = OrderedDict()  # ref 0 but hashed: reusable on a hit
        self.hash_to_page: dict[int, int] = {}
        self.prefix_queries = 0
        self.prefix_hit_tokens = 0
        self.prefix_query_tokens = 0

    # ----- accounting ---------------------------------------------------------------------------------
    @property
    def num_free_pages(self) -> int:
        """Pages that can be handed out now (free plus evictable)."""
        return len(self.free_ids) + len(self.evictable)

    @property
    def num_used_pages(self) -> int:
        return self.num_pages - self.num_free_pages

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def is_whole(self) -> bool:
        """Every page is back in the pool (free or evictable) with no holder."""
        return self.num_free_pages == self.num_pages and all(p.ref_count == 0 for p in self.pages)

    # ----- allocation ---------------------------------------------------------------------------------
    def can_allocate(self, request: Request, num_tokens: int) -> bool:
        return self.pages_for(num_tokens) - len(request.page_table) <= self.num_free_pages

    def allocate(self, request: Request, num_tokens: int) -> None:
        """Grow the request's page table to cover ``num_tokens`` positions."""
        missing = self.pages_for(num_tokens) - len(request.page_table)
        if missing > self.num_free_pages:
            raise RuntimeError(f"out of KV pages: need {missing}, have {self.num_free_pages}")
        for _ in range(missing):
            request.page_table.append(self._take_page())

    def _take_page(self) -> int:
        if self.free_ids:
            page_id = self.free_ids.pop()
        else:
            page_id, _ = self.evictable.popitem(last=False)
            page = self.pages[page_id]
            if page.block_hash is not None and self.hash_to_page.get(page.block_hash) == page_id:
                del self.hash_to_page[page.block_hash]
            page.block_hash = None
        self.pages[page_id].ref_count = 1
        return page_id

    def free(self, request: Request) -> None:
        """Release every page the request holds (its K/V stay matchable while hashed)."""
        for page_id in reversed(request.page_table):
            page = self.pages[page_id]
            page.ref_count -= 1
            if page.ref_count < 0:
                raise RuntimeError(f"page {page_id} freed more often than it was held")
            if page.ref_count == 0:
                if page.block_hash is not None:
                    self.evictable[page_id] = None
                else:
                    self.free_ids.append(page_id)
        request.page_table = []
        request.num_cached = 0

    # ----- prefix caching -----------------------------------------------------------------------------
    @staticmethod
    def _chain(previous: int, tokens: list[int], salt: int) -> int:
        return hash((previous, salt, tuple(tokens)))

    def match_prefix(self, request: Request, cacheable_len: int, salt: int = 0, align: int = 1) -> int:
        """Adopt cached pages for the longest full-page prefix of ``tokens[:cacheable_len]``.

        Returns the number of positions adopted (a multiple of ``page_size`` and of ``align``); the
        request must own no pages yet. At least one position is always left to compute, so the step has
        a query. ``align`` is the strategy's block size: a position's K/V depends on the later positions
        of its block (attention is bidirectional inside a block), so a page is only shared together with
        the rest of its block; a hit ending inside a block would reuse K/V computed beside other tokens.
        """
        if request.page_table:
            raise RuntimeError("match_prefix must run before the request holds pages")
        if not self.enable_prefix_caching:
            return 0
        usable = min(cacheable_len, request.num_prompt - 1) // self.page_size
        self.prefix_queries += 1
        self.prefix_query_tokens += usable * self.page_size
        previous = 0
        adopted: list[int] = []
        for index in range(usable):
            tokens = request.tokens[index * self.page_size : (index + 1) * self.page_size]
            previous = self._chain(previous, tokens, salt)
            page_id = self.hash_to_page.get(previous)
            if page_id is None:
                break
            adopted.append(page_id)
        whole = math.lcm(self.page_size, max(1, align)) // self.page_size  # pages per shareable unit
        del adopted[len(adopted) // whole * whole :]
        for page_id in adopted:
            page = self.pages[page_id]
            if page.ref_count == 0:
                del self.evictable[page_id]
            page.ref_count += 1
        request.page_table = adopted
        hit = len(adopted) * self.page_size
        self.prefix_hit_tokens += hit
        return hit

    def register(self, request: Request, committed_len: int, salt: int = 0) -> None:
        """Publish the request's full pages within ``[0, committed_len)`` for later requests."""
        if not self.enable_prefix_caching:
            return
        previous = 0
        for index in range(min(committed_len // self.page_size, len(request.page_table))):
            tokens = request.tokens[index * self.page_size : (index + 1) * self.page_size]
            previous = self._chain(previous, tokens, salt)
            page = self.pages[request.page_table[index]]
            if page.block_hash is None and previous not in self.hash_to_page:
                page.block_hash = previous
                self.hash_to_page[previous] = page.page_id

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prefix_query_tokens if self.prefix_query_tokens else 0.0
