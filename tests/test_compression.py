"""Update compression: the maths by hand, the codec's checks against hostile payloads, and
every scheme through run_local, the strategies and the simulator."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from fedlift import Compression, FedJob, FLModel, MetaKey, ParamsType, ScriptRunner, run_simulator
from fedlift.codec import (
    COMPRESSION_KEY,
    REQUEST_KEY,
    SIDE_KEY,
    ResultEncoder,
    decode_model,
    densify,
    dequantize_int8,
    encode_model,
    layout_of,
    quantize_int8,
    top_k,
    wire_bytes,
)
from fedlift.errors import ConfigError, InvalidResultError
from fedlift.job import load_job
from fedlift.model._dtypes import bfloat16_dtype
from fedlift.server import CompressionFilter, compression_line
from fedlift.server._store import load_params
from fedlift.simulator import run_local

APP = Path(__file__).parent / "scripts" / "strategy_app"


# ------------------------------------------------------------------ known answers
def test_int8_blockwise_absmax_by_hand() -> None:
    x = np.array([1.0, -2.0, 0.5, 0.0, 3.0, 6.0], np.float32)
    q, scales = quantize_int8(x, 4)
    # block 1 [1, -2, 0.5, 0]: absmax 2, s = 2/127, q = rint(x * 127 / 2) = 63.5 -> 64 (even)
    # block 2 [3, 6] (short): absmax 6, s = 6/127, q = rint(3 * 127 / 6) = 63.5 -> 64, 127
    np.testing.assert_allclose(scales, [2 / 127, 6 / 127], rtol=1e-7)
    assert q.dtype == np.int8
    assert q.tolist() == [64, -127, 32, 0, 64, 127]
    back = dequantize_int8(q, scales, 4)
    np.testing.assert_allclose(
        back, [64 * 2 / 127, -2, 32 * 2 / 127, 0, 64 * 6 / 127, 6], rtol=1e-6
    )
    # the error of each value is at most half its block's step
    assert np.all(np.abs(back - x) <= np.repeat(scales, [4, 2]) / 2 + 1e-7)


def test_int8_keeps_the_shape_and_a_block_of_zeros_has_scale_zero() -> None:
    x = np.zeros((3, 5), np.float32)
    x[2, 4] = -1.5
    q, scales = quantize_int8(x, 8)  # 15 values: blocks of 8 and 7
    assert q.shape == (3, 5)
    assert scales.tolist() == [0.0, pytest.approx(1.5 / 127)]
    assert q[2, 4] == -127 and int(np.abs(q).sum()) == 127
    np.testing.assert_allclose(dequantize_int8(q, scales, 8), x, atol=1e-7)


def test_int8_of_a_model_larger_than_one_chunk_matches_the_plain_formula() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal(256 * 4096 * 2 + 300).astype(np.float32)  # 2 chunks and a tail
    q, scales = quantize_int8(x, 256)
    blocks = np.concatenate([x, np.zeros(-x.size % 256, np.float32)]).reshape(-1, 256)
    s = np.abs(blocks).max(axis=1) / 127
    np.testing.assert_array_equal(scales, s.astype(np.float32))
    expected = np.clip(np.rint(blocks / s[:, None]), -127, 127).reshape(-1)[: x.size]
    np.testing.assert_array_equal(q, expected.astype(np.int8))


def test_top_k_keeps_the_largest_magnitudes_in_index_order() -> None:
    u = np.array([0.1, -5.0, 3.0, 0.2, -0.3], np.float32)
    indices, values = top_k(u, 2)
    assert indices.tolist() == [1, 2] and indices.dtype == np.int32
    assert values.tolist() == [-5.0, 3.0]
    np.testing.assert_array_equal(densify(indices, values, (5,)), [0, -5, 3, 0, 0])
    everything, all_values = top_k(u, 9)  # k past n keeps all
    assert everything.tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(all_values, u)


def test_top_k_error_feedback_sends_what_was_left_out_later() -> None:
    encoder = ResultEncoder()
    spec = Compression(results="topk", top_k=0.25)  # 1 of 4 values per leaf
    w0 = np.zeros(4, np.float32)
    task = FLModel(params={"w": w0})
    # round 1: change [1, 0.5, 0.4, 0] -> sends index 0; left out: [0, 0.5, 0.4, 0]
    sent = encoder.encode(FLModel(params={"w": w0 + [1, 0.5, 0.4, 0]}), task, spec)
    assert sent.params_type == ParamsType.DIFF
    assert sent.meta[SIDE_KEY][0].tolist() == [0] and sent.params["w"].tolist() == [1.0]
    # round 2: change [0, 0.1, 0.3, 0] + left out = [0, 0.6, 0.7, 0] -> sends index 2 (0.7)
    sent = encoder.encode(FLModel(params={"w": w0 + [0, 0.1, 0.3, 0]}), task, spec)
    assert sent.meta[SIDE_KEY][0].tolist() == [2]
    assert sent.params["w"].tolist() == [pytest.approx(0.7)]
    # round 3: no change; what is left (0.6 at index 1) goes now
    sent = encoder.encode(FLModel(params={"w": w0.copy()}), task, spec)
    assert sent.meta[SIDE_KEY][0].tolist() == [1]
    assert sent.params["w"].tolist() == [pytest.approx(0.6)]


@pytest.mark.parametrize("scheme", ["float16", "bfloat16", "int8", "topk"])
def test_every_scheme_round_trips_within_its_rounding(scheme: str) -> None:
    rng = np.random.default_rng(1)
    params = {
        "dense": [
            rng.standard_normal((64, 33)).astype(np.float32),
            np.arange(33, dtype=np.float32),
        ],
        "empty": [],
        "steps": np.array([7], np.int64),  # not a float: sent as it is
        "nothing": np.zeros((0, 3), np.float32),
    }
    model = FLModel(params_type=ParamsType.DIFF, params=params, meta={"k": 1})
    encoded = encode_model(model, scheme, block_size=64, top_k_fraction=0.1)
    assert encoded.meta[COMPRESSION_KEY]["scheme"] == scheme
    assert encoded.params["steps"] is params["steps"]
    decoded = decode_model(encoded, layout_of(params))
    assert decoded.meta == {"k": 1} and decoded.params_type == ParamsType.DIFF
    assert decoded.params["steps"].tolist() == [7]
    assert decoded.params["nothing"].shape == (0, 3)
    for got, want in zip(decoded.params["dense"], params["dense"], strict=True):
        assert got.dtype == np.float32 and got.shape == want.shape
        if scheme == "float16":
            np.testing.assert_allclose(got, want, rtol=2**-11)
        elif scheme == "bfloat16":
            np.testing.assert_allclose(got, want, rtol=2**-8)
        elif scheme == "int8":
            step = np.abs(want).max() / 127  # a bound on each block's step
            assert np.abs(got - want).max() <= step / 2 + 1e-6
        else:
            kept = got != 0
            assert kept.sum() == int(np.ceil(0.1 * want.size))
            np.testing.assert_array_equal(got[kept], want[kept])
            assert np.abs(want[~kept]).max() <= np.abs(want[kept]).min()
    ratio = wire_bytes(model) / wire_bytes(encoded)
    assert ratio == pytest.approx(
        {"float16": 2.0, "bfloat16": 2.0, "int8": 3.7, "topk": 4.6}[scheme], rel=0.1
    )


def test_bfloat16_and_float64_leaves_come_back_as_their_own_dtype() -> None:
    bf16 = bfloat16_dtype()
    params = {"a": np.linspace(-1, 1, 40).astype(bf16), "b": np.linspace(0, 3, 40)}
    decoded = decode_model(encode_model(FLModel(params=params), "int8", block_size=16))
    assert decoded.params["a"].dtype == bf16 and decoded.params["b"].dtype == np.float64
    np.testing.assert_allclose(decoded.params["b"], params["b"], atol=3 / 254 + 1e-9)


def test_float16_refuses_values_it_cannot_carry() -> None:
    with pytest.raises(ConfigError, match="float16 ends at 65504"):
        encode_model(FLModel(params={"w": np.array([1e6], np.float32)}), "float16")


# ------------------------------------------------------------------ settings
def test_compression_settings_are_checked_where_they_enter() -> None:
    with pytest.raises(
        ConfigError, match=r"results=\.\.\.\) must be one of none, float16, .*'gzip'"
    ):
        Compression(results="gzip")
    with pytest.raises(ConfigError, match="top-k keeps a fraction of a change"):
        Compression(model="topk")
    with pytest.raises(ConfigError, match="block_size=4"):
        Compression(block_size=4)
    for bad in (0, 1.5, True, float("nan")):
        with pytest.raises(ConfigError, match="top_k"):
            Compression(top_k=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"unknown option\(s\) 'level'; its options are results"):
        Compression.from_json({"results": "int8", "level": 9})
    assert Compression.from_json("int8") == Compression(results="int8")
    with pytest.raises(ConfigError, match=r"FedJob\(compression=\.\.\.\) must be"):
        FedJob("j", 2, 1, {"w": np.zeros(2)}, compression=5)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"run_local\(compression=\.\.\.\)"):
        run_local(lambda s, m: m, {"w": np.zeros(2)}, 1, 1, compression="zip", quiet=True)


def test_a_job_json_names_its_compression_and_a_bad_one_is_refused(tmp_path: Path) -> None:
    job = FedJob("c", 2, 1, {"w": np.zeros(3, np.float32)},
                 compression=Compression(results="int8", model="float16"))  # fmt: skip
    job.to_clients(ScriptRunner(APP / "train.py", framework="numpy"))
    folder = job.export_job(tmp_path / "jobs")
    data = json.loads((folder / "job.json").read_text())
    assert data["workflow"]["compression"] == {
        "results": "int8", "model": "float16", "block_size": 256, "top_k": 0.01,
    }  # fmt: skip
    config, _ = load_job(folder)
    (f,) = config.workflow.settings().filters
    assert isinstance(f, CompressionFilter) and f.spec.model == "float16"
    data["workflow"]["compression"] = {"results": "int4"}
    (folder / "job.json").write_text(json.dumps(data))
    with pytest.raises(
        ConfigError, match=r"workflow\.compression\(results=\.\.\.\) must be one of"
    ):
        load_job(folder)


# ------------------------------------------------------------------ hostile payloads
def _int8_result(n: int = 1000) -> tuple[FLModel, dict[str, np.ndarray]]:
    reference = {"w": np.zeros(n, np.float32), "b": np.zeros(3, np.float32)}
    change = {"w": np.linspace(-1, 1, n).astype(np.float32), "b": np.ones(3, np.float32)}
    return encode_model(FLModel(params_type=ParamsType.DIFF, params=change), "int8",
                        block_size=64), reference  # fmt: skip


def _tampered(model: FLModel, **meta: object) -> FLModel:
    return FLModel(params_type=model.params_type, params=model.params, meta={**model.meta, **meta})


@pytest.mark.parametrize(
    "attack, match",
    [
        ("short scales", r"float32 scales \(15,\), expected float32 \(16,\)"),
        ("float64 scales", r"float64 scales"),
        ("NaN scale", "negative, NaN or Inf"),
        ("negative scale", "negative, NaN or Inf"),
        ("int16 values", r"is int16 \(1000,\), expected int8"),
        ("a longer leaf", r"expected int8 \(1000,\)"),
        ("no side arrays", r"1 side arrays in meta\['fedlift.compression.side'\]"),
        ("unknown scheme", "compressed by 'lz4'"),
        ("bad block size", "block_size=0"),
        ("dtype lies", "leaf dtypes"),
        ("another layout", "layout differs"),
    ],
)
def test_a_result_that_lies_about_its_encoding_is_refused(attack: str, match: str) -> None:
    model, reference = _int8_result()
    side = list(model.meta[SIDE_KEY])
    info = dict(model.meta[COMPRESSION_KEY])
    params = dict(model.params)
    if attack == "short scales":
        side[0] = side[0][:-1]
    elif attack == "float64 scales":
        side[0] = side[0].astype(np.float64)
    elif attack == "NaN scale":
        side[0] = side[0].copy()
        side[0][3] = np.nan
    elif attack == "negative scale":
        side[0] = -side[0]
    elif attack == "int16 values":
        params["w"] = params["w"].astype(np.int16)
    elif attack == "a longer leaf":
        params["w"] = np.zeros(1064, np.int8)
        side[0] = np.ones(17, np.float32)
    elif attack == "no side arrays":
        side = side[:1]
    elif attack == "unknown scheme":
        info["scheme"] = "lz4"
    elif attack == "bad block size":
        info["block_size"] = 0
    elif attack == "dtype lies":
        info["dtypes"] = ["object", "float32"]
    elif attack == "another layout":
        params = {"w": params["w"]}
        side = side[:1]
        info["dtypes"] = info["dtypes"][:1]
    bad = FLModel(params_type=ParamsType.DIFF, params=params,
                  meta={COMPRESSION_KEY: info, SIDE_KEY: side})  # fmt: skip
    with pytest.raises(InvalidResultError, match=match):
        decode_model(bad, layout_of(reference), who="site 'site-2'")


@pytest.mark.parametrize(
    "indices, values, match",
    [
        ([3, 1], [1.0, 2.0], "out of order"),
        ([1, 1], [1.0, 2.0], "out of order"),
        ([0, 10], [1.0, 2.0], r"outside 0\.\.9"),
        ([-1, 2], [1.0, 2.0], r"outside 0\.\.9"),
        (list(range(11)), [1.0] * 11, "keeps 11 values of a leaf of 10"),
        ([0, 1], [1.0, np.inf], "NaN or Inf"),
        ([0, 1, 2], [1.0, 2.0], "indices"),
    ],
)
def test_top_k_indices_and_values_are_checked(indices: list[int], values: list[float],
                                              match: str) -> None:  # fmt: skip
    bad = FLModel(
        params_type=ParamsType.DIFF,
        params={"w": np.array(values, np.float32)},
        meta={
            COMPRESSION_KEY: {"scheme": "topk", "block_size": 256, "dtypes": ["float32"]},
            SIDE_KEY: [np.array(indices, np.int32)],
        },
    )
    with pytest.raises(InvalidResultError, match=match):
        decode_model(bad, layout_of({"w": np.zeros(10, np.float32)}))
    with pytest.raises(InvalidResultError, match="top-k"):  # without a layout: never decoded
        decode_model(bad)


def test_a_bad_leaf_is_refused_before_any_output_is_allocated() -> None:
    # 10M floats of a reference (40 MB decoded), and a last leaf with one scale short: the
    # decoder checks every leaf before it allocates the output of any.
    n = 10_000_000
    layout = layout_of({"big": np.zeros(1, np.float32), "b": np.zeros(3, np.float32)})
    layout = type(layout)(layout.structure, ((n,), (3,)), layout.dtypes)
    q = np.zeros(n, np.int8)
    bad = FLModel(
        params_type=ParamsType.DIFF,
        params={"big": q, "b": np.zeros(3, np.int8)},
        meta={
            COMPRESSION_KEY: {"scheme": "int8", "block_size": 256, "dtypes": ["float32"] * 2},
            SIDE_KEY: [np.zeros(-(-n // 256), np.float32), np.zeros(0, np.float32)],
        },
    )
    tracemalloc.start()
    try:
        with pytest.raises(InvalidResultError, match=r"leaf 'b' has float32 scales \(0,\)"):
            decode_model(bad, layout)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, f"the refused payload cost {peak:,} bytes"


def test_a_result_decodes_to_the_global_models_dtype_whatever_the_site_claims() -> None:
    model, reference = _int8_result()
    info = {**model.meta[COMPRESSION_KEY], "dtypes": ["float64", "float64"]}  # lies: 2x bytes
    decoded = decode_model(_tampered(model, **{COMPRESSION_KEY: info}), layout_of(reference))
    assert decoded.params["w"].dtype == np.float32 and decoded.params["w"].nbytes == 4000
    with pytest.raises(ConfigError, match="takes a fedlift.codec.Compression"):
        CompressionFilter("int8")  # type: ignore[arg-type]


def test_the_filter_refuses_compressed_params_for_a_task_without_a_model() -> None:
    f = CompressionFilter(Compression(results="int8"))
    model, _ = _int8_result(10)
    with pytest.raises(InvalidResultError, match="task that carried no model"):
        f.on_result("site-1", model)


def test_the_filter_asks_for_the_encoding_counts_bytes_and_decodes() -> None:
    f = CompressionFilter(Compression(results="int8", model="float16", block_size=64))
    task = FLModel(params={"w": np.ones(6400, np.float32)}, meta={"x": 1})
    sent = f.on_task(task)
    assert sent.params["w"].dtype == np.float16
    assert sent.meta[REQUEST_KEY]["results"] == "int8"
    received = decode_model(sent)
    np.testing.assert_array_equal(received.params["w"], task.params["w"])
    result = ResultEncoder().encode(
        FLModel(params={"w": received.params["w"] + 0.5}), received, ResultEncoder().request(sent)
    )
    back = f.on_result("site-1", result)
    assert back.params_type == ParamsType.DIFF
    np.testing.assert_allclose(back.params["w"], 0.5, rtol=1e-6)
    summary = f.summary()["compression"]
    assert summary["model_bytes"] == 25600 and summary["model_bytes_sent"] == 12800
    assert summary["result_bytes"] == 25600 and summary["result_bytes_received"] == 6400 + 400
    assert compression_line({"compression": summary}) == (
        "model 25.6 kB -> 12.8 kB (float16, 2.0x); results 25.6 kB -> 6.8 kB (int8, 3.8x)"
    )
    assert f.summary()["compression"]["model_bytes"] == 0  # counted once


# ------------------------------------------------------------------ whole runs
def _client(site: str, model: FLModel) -> FLModel:
    """Site i moves every value by 0.5 * (i + 1) (weight 1): the mean move is exact in int8."""
    if model.meta[MetaKey.TASK_NAME] != "train":
        return FLModel(metrics={"accuracy": 1.0})
    shift = 0.5 * int(site.split("-")[1])
    params = {k: np.asarray(v) + np.float32(shift) for k, v in model.params.items()}
    meta = {}
    if "scaffold_c_global" in model.meta:  # SCAFFOLD: no change of the control variate
        meta["scaffold_c_diff"] = {k: np.zeros_like(v) for k, v in params.items()}
    return FLModel(params=params, metrics={"accuracy": 1.0}, meta=meta)


@pytest.mark.parametrize(
    "spec",
    [
        Compression(results="float16"),
        Compression(results="bfloat16", model="bfloat16"),
        Compression(results="int8", model="int8"),
        Compression(results="topk", top_k=1.0),
    ],
    ids=["float16", "bfloat16", "int8", "topk"],
)
def test_run_local_with_each_scheme_gives_the_hand_computed_model(
    tmp_path: Path, spec: Compression
) -> None:
    initial = {"w": np.full(5000, 0.25, np.float32), "b": np.zeros(4, np.float32)}
    result = run_local(_client, initial, 2, 2, workspace=tmp_path, compression=spec, quiet=True)
    # two rounds of the mean move (0.5 + 1.0) / 2 = 0.75 from 0.25: 1.75 (0.25 for b: 1.5)
    np.testing.assert_allclose(result.params["w"], 1.75, rtol=1e-3)
    np.testing.assert_allclose(result.params["b"], 1.5, rtol=1e-3)
    lines = [
        json.loads(x) for x in (tmp_path / "server" / "metrics.jsonl").read_text().splitlines()
    ]
    info = lines[0]["extra"]["compression"]
    assert info["results"] == spec.results
    assert info["model_bytes"] == 5004 * 4
    ratio = info["result_bytes"] / info["result_bytes_received"]
    assert ratio == pytest.approx({"float16": 2, "bfloat16": 2, "int8": 3.9, "topk": 0.5}
                                  [spec.results], rel=0.05)  # fmt: skip
    assert info["result_bytes"] == 2 * 5004 * 4


def test_top_k_at_ten_percent_converges_as_fast_as_the_dense_run() -> None:
    rng = np.random.default_rng(3)
    target = rng.standard_normal(2000).astype(np.float32)

    def client(site: str, model: FLModel) -> FLModel:  # a step of 0.1 towards the target
        w = np.asarray(model.params["w"])
        return FLModel(params={"w": w + 0.1 * (target - w)})

    def error(compression: Compression | None) -> float:
        result = run_local(client, {"w": np.zeros(2000, np.float32)}, 2, 40, quiet=True,
                           threads=1, compression=compression)  # fmt: skip
        return float(np.abs(result.params["w"] - target).mean() / np.abs(target).mean())

    dense = error(None)
    assert dense == pytest.approx(0.9**40, rel=1e-3)  # each round leaves 0.9 of the gap
    # a tenth of the values a round; what is left out waits in the error feedback, so the
    # gap still closes (without the feedback, 90% of each round's change would be lost)
    assert error(Compression(results="topk", top_k=0.1)) < 2 * dense


def test_every_kind_of_strategy_takes_compressed_results() -> None:
    from fedlift.server import Cyclic, FedAdam, FedAvg, FedMedian, Scaffold

    spec = Compression(results="int8", model="float16")
    for strategy in (FedAdam(eta=0.1), FedAvg(aggregator=FedMedian()), Cyclic(), Scaffold()):
        result = run_local(_client, {"w": np.zeros(300, np.float32)}, 3, 2, quiet=True,
                           strategy=strategy, compression=spec)  # fmt: skip
        assert result.rounds[0].extra["compression"]["result_bytes_received"] > 0
        assert np.isfinite(result.params["w"]).all() and result.params["w"].mean() > 0
    # Cyclic: each of 3 sites adds its shift in turn, 2 rounds: 2 * (0.5 + 1 + 1.5) = 6
    cyclic = run_local(_client, {"w": np.zeros(300, np.float32)}, 3, 2, quiet=True,
                       strategy=Cyclic(), compression=spec)  # fmt: skip
    np.testing.assert_allclose(cyclic.params["w"], 6.0, rtol=1e-3)


def test_the_simulator_sends_compressed_models_and_records_the_bytes(tmp_path: Path) -> None:
    job = FedJob("c", 2, 2, {"w": np.zeros(4096, np.float32)}, final_evaluation=False,
                 compression=Compression(results="int8", model="float16"))  # fmt: skip
    job.to_clients(ScriptRunner(APP / "train.py", framework="numpy"))
    folder = job.export_job(tmp_path / "jobs")
    run_simulator(folder, tmp_path / "ws", quiet=True)
    # site i pulls halfway to i + 1: round 1 from 0 gives 0.75, round 2 0.75 + 0.5 * 0.75
    w = load_params(tmp_path / "ws" / "server" / "models" / "global_model.safetensors")["w"]
    np.testing.assert_allclose(w, 1.125, rtol=2e-3)
    lines = (tmp_path / "ws" / "server" / "metrics.jsonl").read_text().splitlines()
    info = json.loads(lines[-1])["extra"]["compression"]
    assert info["model_bytes"] == 4096 * 4 and info["model_bytes_sent"] == 4096 * 2
    assert info["result_bytes"] / info["result_bytes_received"] == pytest.approx(3.9, rel=0.02)
