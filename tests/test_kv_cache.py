"""Paged KV-cache bookkeeping: allocation, ref counts, prefix caching, eviction."""

from __future__ import annotations

import pytest

from diffulex.engine.kv_cache import KVCacheManager
from diffulex.request import Request
from diffulex.sampling_params import SamplingParams


def make_request(prompt: list[int], rid: str = "r") -> Request:
    return Request(rid, prompt, SamplingParams(max_tokens=4), mask_token_id=0, eos_token_ids=(1,))


def test_allocate_grows_page_table_and_free_returns_everything() -> None:
    kv = KVCacheManager(num_pages=4, page_size=4)
    request = make_request([5] * 6)
    kv.allocate(request, 6)
    assert len(request.page_table) == 2 and kv.num_free_pages == 2
    kv.allocate(request, 8)  # still two pages
    assert len(request.page_table) == 2
    kv.allocate(request, 9)
    assert len(request.page_table) == 3
    assert not kv.can_allocate(request, 17) and kv.can_allocate(request, 16)
    with pytest.raises(RuntimeError, match="out of KV pages"):
        kv.allocate(request, 20)
    kv.free(request)
    assert request.page_table == [] and kv.is_whole()


def test_prefix_pages_are_shared_and_ref_counted() -> None:
    kv = KVCacheManager(num_pages=8, page_size=4)
    first = make_request(list(range(10, 23)), "a")  # 13 tokens: 3 full pages
    kv.allocate(first, 13)
    kv.register(first, committed_len=12)
    second = make_request(list(range(10, 22)) + [99, 98], "b")  # shares 12 tokens
    hit = kv.match_prefix(second, cacheable_len=12)
    assert hit == 12
    assert second.page_table == first.page_table[:3]
    assert all(kv.pages[p].ref_count == 2 for p in second.page_table)
    kv.free(first)
    assert all(kv.pages[p].ref_count == 1 for p in second.page_table)
    kv.free(second)
    assert kv.is_whole()


def test_prefix_match_leaves_one_token_to_compute_and_respects_cacheable_len() -> None:
    kv = KVCacheManager(num_pages=8, page_size=4)
    first = make_request(list(range(8)), "a")
    kv.allocate(first, 8)
    kv.register(first, 8)
    same = make_request(list(range(8)), "b")
    assert kv.match_prefix(same, cacheable_len=8) == 4  # the last page holds the final prompt token
    kv.free(same)
    other = make_request(list(range(8)) + [1, 2], "c")
    assert kv.match_prefix(other, cacheable_len=4) == 4
    kv.free(other)
    different_salt = make_request(list(range(8)) + [1], "d")
    assert kv.match_prefix(different_salt, cacheable_len=8, salt=7) == 0
    kv.free(different_salt)
    kv.free(first)
    assert kv.is_whole()


def test_freed_hashed_pages_stay_matchable_until_evicted() -> None:
    kv = KVCacheManager(num_pages=3, page_size=2)
    first = make_request([1, 2, 3, 4, 5], "a")
    kv.allocate(first, 4)
    kv.register(first, 4)
    kv.free(first)
    again = make_request([1, 2, 3, 4, 5], "b")
    assert kv.match_prefix(again, cacheable_len=4) == 4
    kv.free(again)
    hog = make_request([9] * 6, "c")
    kv.allocate(hog, 6)  # needs all three pages: the hashed ones are evicted
    assert kv.num_free_pages == 0
    kv.free(hog)
    late = make_request([1, 2, 3, 4, 5], "d")
    assert kv.match_prefix(late, cacheable_len=4) == 0
    assert kv.is_whole()


def test_disabled_prefix_caching_never_matches() -> None:
    kv = KVCacheManager(num_pages=4, page_size=2, enable_prefix_caching=False)
    first = make_request([1, 2, 3], "a")
    kv.allocate(first, 2)
    kv.register(first, 2)
    second = make_request([1, 2, 3], "b")
    assert kv.match_prefix(second, cacheable_len=2) == 0
    kv.free(first)
    assert kv.is_whole()


def test_prefix_hit_ends_on_a_whole_block_when_pages_are_smaller() -> None:
    """Page 4, block 8: a prompt sharing 12 tokens shares one whole block (8), never half of the next."""
    kv = KVCacheManager(num_pages=16, page_size=4)
    first = make_request(list(range(10, 27)), "a")  # 17 tokens: two whole blocks of 8
    kv.allocate(first, 17)
    kv.register(first, committed_len=16)
    second = make_request(list(range(10, 22)) + [99, 98, 97, 96, 95], "b")  # same first 12 tokens
    assert kv.match_prefix(second, cacheable_len=16) == 12  # page-aligned alone: would share 3 pages
    kv.free(second)
    third = make_request(list(range(10, 22)) + [99, 98, 97, 96, 95], "c")
    assert kv.match_prefix(third, cacheable_len=16, align=8) == 8
    assert third.page_table == first.page_table[:2]
    kv.free(first)
    kv.free(third)
    assert kv.is_whole()
