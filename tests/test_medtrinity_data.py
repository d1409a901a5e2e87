"""MedTrinity as the lab has it (`load_dataset("UCSC-VLAA/MedTrinity-25M", "25M_demo")`): a hub snapshot (a config
folder of parquet shards with the datasets Image struct column {bytes, path}) and a datasets cache folder
(load_dataset with cache_dir) are read by the BLIP reader, lazily, one parquet row group at a time."""
from __future__ import annotations

import pytest

from conftest import write_snapshot


@pytest.fixture(scope="module")
def rows_table(tmp_path_factory):
    """The synthetic rows (real scikit-image medical images, one truncated PNG) as a pyarrow table."""
    import pyarrow.parquet as pq

    from core.data.medtrinity import write_synthetic

    folder = write_synthetic(tmp_path_factory.mktemp("medtrinity"))
    return pq.read_table(str(folder / "rows.parquet"))


@pytest.mark.parametrize("names", [["train-00000-of-00003.parquet", "train-00001-of-00003.parquet",
                                    "train-00002-of-00003.parquet"], ["part_a.parquet", "part_b.parquet"]])
def test_hub_snapshot_shards_are_read_lazily_by_row_group(tmp_path, rows_table, names):
    from core.data.medtrinity import ParquetColumns, open_rows

    snapshot = write_snapshot(tmp_path / "snap", rows_table, names)
    for path, config in ((snapshot, "25M_demo"), (snapshot / "25M_demo", None)):
        rows = open_rows(str(path), hf_config=config)
        assert rows.ids == rows_table.column("id").to_pylist() and len(rows) == 48
        assert isinstance(rows.images, ParquetColumns) and not rows.images._cached  # no image read yet
        img = rows.image(17)
        assert img.mode == "RGB" and img.size == (48, 48)
        # only row 17's row group (5 rows) was read
        assert [len(column) for column in rows.images._cached.values()] == [5]
        decoded = [rows.image(i) for i in range(len(rows))]
        assert len(rows.images._cached) == 4  # at most 4 row groups held
        assert sum(d is None for d in decoded) == 1 and list(rows.failed) == ["syn00047"]


def test_datasets_cache_folder_with_hf_config(tmp_path, rows_table):
    from datasets import load_dataset

    from core.data.medtrinity import open_rows
    from core.errors import DatasetError

    snapshot = write_snapshot(tmp_path / "snap", rows_table, ["train-00000-of-00002.parquet",
                                                              "train-00001-of-00002.parquet"])
    cache = tmp_path / "cache"
    ds = load_dataset("parquet", data_dir=str(snapshot / "25M_demo"), cache_dir=str(cache))
    config = ds["train"].config_name if hasattr(ds["train"], "config_name") else "default"
    rows = open_rows(str(cache), hf_config=config)
    assert rows.ids == rows_table.column("id").to_pylist()
    assert rows.image(3).size == (48, 48) and rows.image(47) is None and list(rows.failed) == ["syn00047"]
    with pytest.raises(DatasetError, match="data.hf_config"):
        open_rows(str(cache))


def test_a_config_the_snapshot_does_not_have_is_refused_not_replaced_by_every_shard(tmp_path, rows_table):
    """data.hf_config misspelled on a snapshot with config folders: refused naming the folders there (reading every
    parquet file instead would mix other configs' rows into training); a path is no config name."""
    from core.config import SpecError, load_spec
    from core.data.medtrinity import open_rows
    from core.errors import DatasetError

    snapshot = write_snapshot(tmp_path / "snap", rows_table, ["train-00000-of-00001.parquet"])
    with pytest.raises(DatasetError, match=r"data.hf_config: '25M_dmeo' is not a folder of the snapshot .*snap; its "
                                           r"folders with parquet shards are \['25M_demo'\]"):
        open_rows(str(snapshot), hf_config="25M_dmeo")
    for bad in ("../25M_demo", "/abs", ".hidden"):
        with pytest.raises(SpecError, match=r"data.hf_config: String should match pattern"):
            load_spec("jobs/tiny/blip_medtrinity.yaml", (f"data.hf_config={bad}",))
