"""bench/kv_cache.py decodes the same tokens with both caches (it refuses to report times otherwise) and reports a
row per completion length."""

from bench.kv_cache import CACHES, measure


def test_both_caches_decode_the_same_tokens_and_are_timed():
    rows = measure([3, 9], batch_size=2, prompt=5, repeats=1)
    assert [row["completion_tokens"] for row in rows] == [3, 9]
    for row in rows:
        assert all(row[f"{name} median_s"] > 0 and row[f"{name} min_s"] > 0 for name in CACHES)
        assert row["dynamic_over_growing_median"] > 0
