"""Damage in every kind of store file is named by `cdpctl verify` (offline and through
cdpd), never read back as other bytes (EIO or a refused volume instead), and
`cdpctl verify --repair` rebuilds what is derived from the journal (maps, manifest,
markers, catalog) while reporting journal damage as not repairable."""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest

from tools.torture.corrupt import CASES, build_store, run_case


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    return build_store(tmp_path_factory.mktemp("pristine"), seed=21)


@pytest.mark.parametrize("kind", CASES)
def test_damage_is_named_never_served_and_repaired(kind: str, pristine: tuple[Path, object], tmp_path: Path) -> None:
    store, state = pristine
    c = run_case(kind, store, state, tmp_path / "case", seed=zlib.crc32(kind.encode()))  # type: ignore[arg-type]
    assert c.detected, f"{kind}: cdpctl verify did not exit 6"
    assert c.named, f"{kind}: cdpctl verify did not name {c.file.name}"
    assert c.wrong_chunks == 0, f"{kind}: damaged data was served as other bytes"
    assert c.daemon_started, f"{kind}: cdpd did not start on a store with one damaged file"
    assert c.others_served, f"{kind}: the undamaged volume was not served in full"
    assert c.good_chunks > 0 or c.vol0_refused, \
        f"{kind}: vol0 neither served nor refused with a clear error"
    if kind.startswith("journal"):
        assert c.daemon_started and c.eio_chunks > 0, "reads touching the damage must fail with EIO"
        assert c.good_chunks > 0, "everything else must still be served"
    assert c.repaired, c.repair_output
