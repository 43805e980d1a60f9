"""``all_reduce()`` of Moments / Similarity across two real ``gloo`` processes (loopback).

Each rank computes ``layer_moments`` / ``block_similarity`` on its share of one seeded,
padded batch (3 samples on rank 0, 2 on rank 1), all-reduces, and writes ``raw()`` to a
file; the parent checks that both ranks got bit-identical results, equal (counts exactly,
floats to 1e-9 relative) to one process that saw the whole batch.
"""

import json
import os
import socket
import traceback

# Set before anything imports avss_fast (also in the spawned children, which import this
# module to unpickle the worker).
os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("AVSS_FAST_BACKEND", "torch")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

WORLD = 2
SPLIT = (3, 2)  # samples per rank: different sizes on purpose
B, T, D = sum(SPLIT), 7, 12
JOIN_TIMEOUT_S = 90


def make_batch():
    """The fixed batch: h_in, h_out [B, T, D] fp32 and a right-padded 0/1 mask."""
    g = torch.Generator().manual_seed(1234)
    h_in = torch.randn(B, T, D, generator=g) * 3.0 + 0.75
    h_out = h_in + 0.4 * torch.randn(B, T, D, generator=g)
    lengths = torch.tensor([7, 4, 1, 6, 3])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(torch.int64)
    h_in[mask == 0] = 1e4  # padding garbage that must not leak into any statistic
    return h_in, h_out, mask


def rank_slice(rank: int) -> slice:
    start = sum(SPLIT[:rank])
    return slice(start, start + SPLIT[rank])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _in_rank(rank: int, port: int, out_dir: str, work) -> None:
    """Spawned child: join the gloo group as ``rank``, write ``work(rank)`` (a JSON-able
    result) to rank<r>.json, or the traceback to rank<r>.err, then leave without teardown."""
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["AVSS_FAST_BACKEND"] = "torch"
    if os.path.isdir("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
        try:
            result = work(rank)
            with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
                json.dump(result, f)
            dist.barrier()  # both ranks have written their results
        except BaseException:
            dist.destroy_process_group()
            raise
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    _exit_without_teardown()


def _moments_work(rank: int) -> dict:
    from avss_fast.ops import block_similarity, layer_moments

    h_in, h_out, mask = make_batch()
    sl = rank_slice(rank)
    m = layer_moments(h_in[sl], mask[sl], sparsity_rel=0.25)
    s = block_similarity(h_in[sl], h_out[sl], mask[sl])
    local = {"moments": m.raw(), "similarity": s.raw()}
    mr, sr = m.all_reduce(), s.all_reduce()
    return {
        "moments": mr.raw(),
        "similarity": sr.raw(),
        "local": local,
        "local_after": {"moments": m.raw(), "similarity": s.raw()},  # self is unchanged
        "types": [type(mr).__name__, type(sr).__name__],
    }


def _worker(rank: int, port: int, out_dir: str) -> None:
    """Spawned child: one rank of the Moments / Similarity test. Top level so that it pickles."""
    _in_rank(rank, port, out_dir, _moments_work)


def _exit_without_teardown() -> None:
    """End a rank that finished its work: gloo's process-group teardown at interpreter exit
    sometimes aborts ("terminate called without an active exception", SIGABRT) when the
    other rank has already gone; the results are written and both ranks passed the
    barrier, so leave without running C++ destructors."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _run_ranks(out_dir: str, target=None) -> None:
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=target or _worker, args=(r, port, out_dir), daemon=True) for r in range(WORLD)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(JOIN_TIMEOUT_S)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        if hung:
            pytest.fail(f"rank(s) {hung} still running after {JOIN_TIMEOUT_S}s (deadlock in all_reduce / init?)")
        bad = {r: p.exitcode for r, p in enumerate(procs) if p.exitcode != 0}
        if bad:
            errs = "\n".join(
                f"--- rank {r} ---\n" + open(os.path.join(out_dir, f"rank{r}.err")).read()
                for r in bad
                if os.path.exists(os.path.join(out_dir, f"rank{r}.err"))
            )
            pytest.fail(f"rank exit codes {bad}\n{errs}")
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)


def _assert_raw_close(got: dict, ref: dict, what: str, rtol=1e-9) -> None:
    assert got.keys() == ref.keys(), what
    for k, e in ref.items():
        a = got[k]
        if isinstance(e, int):
            assert isinstance(a, int) and a == e, f"{what}.{k}: got {a}, expected {e} (counts must match exactly)"
        else:
            assert abs(a - e) <= rtol * abs(e) + 1e-12, f"{what}.{k}: got {a!r}, expected {e!r}"


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_all_reduce_two_gloo_ranks_equals_single_process(tmp_path, monkeypatch):
    monkeypatch.setenv("AVSS_FAST_BACKEND", "torch")
    from avss_fast.ops import block_similarity, layer_moments

    _run_ranks(str(tmp_path))
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]

    # every rank gets the same, bit for bit (same gathered data, merged in rank order)
    assert res[0]["moments"] == res[1]["moments"]
    assert res[0]["similarity"] == res[1]["similarity"]
    assert res[0]["types"] == res[1]["types"] == ["Moments", "Similarity"]
    for r in range(WORLD):  # all_reduce returned a new object; the local one is unchanged
        assert res[r]["local_after"] == res[r]["local"]

    h_in, h_out, mask = make_batch()
    whole_m = layer_moments(h_in, mask, sparsity_rel=0.25).raw()
    whole_s = block_similarity(h_in, h_out, mask).raw()
    for r in range(WORLD):
        _assert_raw_close(res[r]["moments"], whole_m, f"rank{r}.moments")
        _assert_raw_close(res[r]["similarity"], whole_s, f"rank{r}.similarity")

    # the ranks' local partials are what this process computes on the same slices
    for r in range(WORLD):
        sl = rank_slice(r)
        assert res[r]["local"]["moments"] == layer_moments(h_in[sl], mask[sl], sparsity_rel=0.25).raw()
        assert res[r]["local"]["similarity"] == block_similarity(h_in[sl], h_out[sl], mask[sl]).raw()

    # sanity on the data: padding really was excluded, and the ranks' shares add up
    assert whole_m["tokens"] == int(mask.sum()) == 21
    assert whole_m["elements"] == 21 * D and whole_m["samples"] == B
    assert whole_s["tokens"] == 21
    assert res[0]["local"]["moments"]["tokens"] == 12 and res[1]["local"]["moments"]["tokens"] == 9


def test_all_reduce_without_process_group_is_identity():
    from avss_fast.ops import block_similarity, layer_moments
    from avss_fast.stats import Moments, Similarity

    assert not (dist.is_available() and dist.is_initialized())
    h_in, h_out, mask = make_batch()
    m = layer_moments(h_in, mask)
    s = block_similarity(h_in, h_out, mask)
    for acc in (m, s, Moments.zeros(), Similarity.zeros()):
        assert acc.all_reduce() is acc


# ----------------------------------------------------------------------------- HeadScorer


def head_batch():
    """A padded token batch for the tiny model (rows split 3 / 2 between the ranks)."""
    g = torch.Generator().manual_seed(99)
    ids = torch.randint(3, 100, (B, 9), generator=g)
    am = torch.ones_like(ids)
    am[1, :3] = 0  # left padding on rank 0
    am[4, 6:] = 0  # right padding on rank 1
    return ids, am


def head_model():
    from tiny_models import make_tiny

    return make_tiny("llama", num_layers=2, heads=4, kv_heads=2, vocab=100)


def _head_work(rank: int, uneven: bool = False) -> dict:
    """One rank's merged HeadScorer report: its share of the batch, or with ``uneven`` the
    whole batch on rank 0 and nothing on rank 1 (its report must still join the merge)."""
    import torch

    from avss_fast.head_stats import HeadScorer

    model = head_model()
    ids, am = head_batch()
    sl = slice(None) if uneven else rank_slice(rank)
    with torch.no_grad(), HeadScorer(model, segment_starts=[0, 4]) as scorer:
        if not uneven or rank == 0:
            model(input_ids=ids[sl], attention_mask=am[sl])
    return scorer.report().to_dict()  # merges the ranks: a process group is initialised


def _head_worker(rank: int, port: int, out_dir: str) -> None:
    _in_rank(rank, port, out_dir, _head_work)


def _head_worker_rank0_only(rank: int, port: int, out_dir: str) -> None:
    _in_rank(rank, port, out_dir, lambda r: _head_work(r, uneven=True))


def _merged_and_whole(tmp_path, worker) -> tuple[dict, dict]:
    """Both ranks' merged reports (asserted equal) and one process's report of the batch."""
    from avss_fast.head_stats import HeadScorer

    _run_ranks(str(tmp_path), worker)
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert res[0] == res[1]
    model = head_model()
    ids, am = head_batch()
    with torch.no_grad(), HeadScorer(model, segment_starts=[0, 4]) as scorer:
        model(input_ids=ids, attention_mask=am)
    return res[0], scorer.report(all_reduce=False).to_dict()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_head_scorer_merges_a_rank_without_data(tmp_path, monkeypatch):
    monkeypatch.setenv("AVSS_FAST_BACKEND", "torch")
    merged, whole = _merged_and_whole(tmp_path, _head_worker_rank0_only)
    assert merged == whole  # merging an empty share is exact


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_head_scorer_merges_ranks(tmp_path, monkeypatch):
    monkeypatch.setenv("AVSS_FAST_BACKEND", "torch")
    merged, whole = _merged_and_whole(tmp_path, _head_worker)
    _, am = head_batch()
    assert merged["rows"] == whole["rows"] and whole["rows"][0][0] == int(am.sum())
    for name, d in whole["stats"].items():
        for key in ("mean", "var"):
            got, exp = torch.tensor(merged["stats"][name][key]), torch.tensor(d[key])
            assert torch.allclose(got, exp, rtol=1e-6, atol=1e-9), f"{name}.{key}"
