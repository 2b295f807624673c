"""The store-wide size limit counts every version of every name of every kind (on every backend)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_store_local import CONFIG, make_weights

from store.errors import StoreFull


def test_usage_sums_all_versions_names_and_kinds(make_store: Callable[..., Any], tmp_path: Path) -> None:
    store = make_store()
    sizes = {("tasks", "a"): [100, 150], ("tasks", "b"): [200], ("hypernetworks", "h"): [300]}
    for (kind, name), versions in sizes.items():
        for i, size in enumerate(versions):
            weights = make_weights(tmp_path, b"w" * size, name=f"{kind}-{name}-{i}.bin")
            store.put_version(kind, name, config_bytes=CONFIG, weights_src=weights)
    assert store.usage_bytes() == 100 + 150 + 200 + 300 + 4 * len(CONFIG)


def test_the_limit_is_checked_against_the_total_not_one_name(
    make_store: Callable[..., Any], tmp_path: Path
) -> None:
    limit = 3 * (100 + len(CONFIG))
    store = make_store(max_store_bytes=limit)
    for name in ("a", "b", "c"):
        store.put_version("tasks", name, config_bytes=CONFIG, weights_src=make_weights(tmp_path, b"w" * 100))
    assert store.usage_bytes() == limit  # exactly at the limit is allowed
    with pytest.raises(StoreFull) as info:
        store.put_version("tasks", "d", config_bytes=CONFIG, weights_src=make_weights(tmp_path, b"w"))
    assert info.value.details == {"limit": limit}
    assert store.list_names("tasks") == ["a", "b", "c"]
