"""pyalign.distributed with two real gloo processes: strided shards, ordered gather, sums."""

import os

import torch
import torch.multiprocessing as mp
from helpers_processes import free_port

from pyalign import distributed


def _worker(rank, world, port, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    assert distributed.init_from_env("cpu")
    items = [f"item{i}" for i in range(7)]
    mine = distributed.shard(items)
    gathered = distributed.gather_in_order([s.upper() for s in mine])
    total = distributed.all_reduce_sum(torch.tensor([float(len(mine))]))
    chosen = distributed.broadcast_object({"from": distributed.rank()})
    torch.save({"mine": mine, "gathered": gathered, "total": total.item(), "chosen": chosen,
                "main": distributed.is_main()}, os.path.join(out_dir, f"{rank}.pt"))
    distributed.shutdown()


def test_two_processes_shard_and_gather_in_order(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    assert results[0]["mine"] == ["item0", "item2", "item4", "item6"]
    assert results[1]["mine"] == ["item1", "item3", "item5"]
    for result in results:
        assert result["gathered"] == [f"ITEM{i}" for i in range(7)]
        assert result["total"] == 7.0
        assert result["chosen"] == {"from": 0}
    assert [r["main"] for r in results] == [True, False]


def test_single_process_defaults(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not distributed.launched()
    assert not distributed.init_from_env("cpu")
    assert distributed.rank() == 0 and distributed.world_size() == 1 and distributed.is_main()
    assert distributed.shard_indices(5) == [0, 1, 2, 3, 4]
    assert distributed.shard_indices(5, rank_=1, world=3) == [1, 4]
    assert distributed.gather_in_order([1, 2]) == [1, 2]
