"""The Client API (``import fedlift.client as flare``) against a LocalLink, without a server.

A helper thread plays the site's worker: it offers tasks on the link, waits for the
script's results and stops the link at the end.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import fedlift.client as flare
from fedlift.client._api import _reset_for_tests
from fedlift.client._link import ClientContext, LocalLink, Task, set_current_link
from fedlift.codec import Message, decode, encode, model_from_wire, model_to_wire
from fedlift.errors import ClientAPIError, ReceiveTimeoutError

CONFIG = {"job_name": "demo", "num_rounds": 3, "runner": {"script": "train.py"}}


class Site:
    """A LocalLink plus what it forwarded to the worker."""

    def __init__(self) -> None:
        self.logs: list[dict[str, Any]] = []
        self.link = LocalLink(
            ClientContext("job-42", "site-2", 1, 3, dict(CONFIG)), on_log=self.logs.append
        )


class FakeWorker(threading.Thread):
    """Offers ``tasks`` one by one, collects the answers, then stops the link."""

    def __init__(self, link: LocalLink, tasks: list[Task], delay: float = 0.0) -> None:
        super().__init__(daemon=True)
        self.link, self.tasks, self.delay = link, tasks, delay
        self.results: list[Any] = []

    def run(self) -> None:
        time.sleep(self.delay)
        for task in self.tasks:
            self.link.offer(task)
            self.results.append(self.link.wait_result(task.task_id))
        self.link.stop()


def task(round_number: int | None = 0, name: str = "train", task_id: str | None = None) -> Task:
    model = flare.FLModel(
        params={"dense": [np.full((2, 2), float(round_number or 0)), np.zeros(2)], "pool": []},
        current_round=round_number,
        total_rounds=3,
    )
    return Task(task_id or f"t{round_number}-{name}", name, model)


@pytest.fixture
def no_job() -> Iterator[None]:
    _reset_for_tests()
    set_current_link(None)
    yield
    _reset_for_tests()


@pytest.fixture
def site(monkeypatch: pytest.MonkeyPatch) -> Iterator[Site]:
    monkeypatch.delenv("RANK", raising=False)
    _reset_for_tests()
    s = Site()
    set_current_link(s.link)
    yield s
    s.link.stop()
    set_current_link(None)
    _reset_for_tests()


@pytest.fixture
def ready(site: Site) -> Site:
    flare.init()
    return site


# ---------------------------------------------------------------- init


def test_init_without_a_job_says_how_to_run_the_script(no_job: None) -> None:
    with pytest.raises(ClientAPIError) as info:
        flare.init()
    message = str(info.value)
    assert "found no fedlift job" in message
    assert "fedlift simulator" in message
    assert "ScriptRunner" in message


CALLS_BEFORE_INIT = [
    ("receive", lambda: flare.receive()),
    ("send", lambda: flare.send(flare.FLModel(metrics={"a": 1.0}))),
    ("is_running", lambda: flare.is_running()),
    ("system_info", lambda: flare.system_info()),
    ("get_job_id", lambda: flare.get_job_id()),
    ("get_site_name", lambda: flare.get_site_name()),
    ("get_config", lambda: flare.get_config()),
    ("log", lambda: flare.log("loss", 1.0)),
    ("is_train", lambda: flare.is_train()),
    ("is_evaluate", lambda: flare.is_evaluate()),
    ("is_submit_model", lambda: flare.is_submit_model()),
]


@pytest.mark.parametrize(("name", "call"), CALLS_BEFORE_INIT, ids=[c[0] for c in CALLS_BEFORE_INIT])
def test_every_call_before_init_is_an_error(site: Site, name: str, call: Any) -> None:
    with pytest.raises(ClientAPIError) as info:
        call()
    assert f"fedlift.client.{name}() was called before init()" in str(info.value)
    assert "flare.init()" in str(info.value)


def test_init_twice_is_harmless(ready: Site) -> None:
    flare.init()
    assert flare.get_site_name() == "site-2"


# ---------------------------------------------------------------- receive / send order


def test_send_before_receive(ready: Site) -> None:
    with pytest.raises(ClientAPIError) as info:
        flare.send(flare.FLModel(metrics={"accuracy": 1.0}))
    assert "send() was called before receive()" in str(info.value)
    assert "flare.receive()" in str(info.value)


def test_send_takes_an_flmodel(ready: Site) -> None:
    ready.link.offer(task(0))
    flare.receive()
    with pytest.raises(ClientAPIError) as info:
        flare.send({"params": {}})  # type: ignore[arg-type]
    assert "send() takes an FLModel; received: dict" in str(info.value)
    assert "flare.FLModel(" in str(info.value)


def test_full_round_trip_with_a_worker_thread(ready: Site) -> None:
    worker = FakeWorker(ready.link, [task(0), task(1), task(2)])
    worker.start()
    seen = []
    while flare.is_running():
        model = flare.receive()
        assert model is not None
        seen.append(model.current_round)
        new = {"dense": [a + 1 for a in model.params["dense"]], "pool": []}
        flare.send(
            flare.FLModel(
                params=new, metrics={"accuracy": 0.5}, meta={"NUM_STEPS_CURRENT_ROUND": 10}
            )
        )
    worker.join(5)
    assert not worker.is_alive()
    assert seen == [0, 1, 2]
    assert len(worker.results) == 3
    for round_number, got in enumerate(worker.results):
        assert isinstance(got, flare.FLModel)
        assert got.current_round == round_number
        assert got.total_rounds == 3
        assert np.array_equal(got.params["dense"][0], np.full((2, 2), round_number + 1.0))
        assert got.weight() == 10.0
    assert flare.receive() is None
    assert flare.is_running() is False


def test_second_send_is_an_error(ready: Site) -> None:
    ready.link.offer(task(2))
    flare.receive()
    flare.send(flare.FLModel(metrics={"accuracy": 0.5}))
    with pytest.raises(ClientAPIError) as info:
        flare.send(flare.FLModel(metrics={"accuracy": 0.6}))
    assert "send() was already called for round 2" in str(info.value)
    assert "call receive()" in str(info.value)


def test_second_send_is_an_error_without_clearing_the_cache(ready: Site) -> None:
    ready.link.offer(task(1))
    flare.receive()
    flare.send(flare.FLModel(metrics={"accuracy": 0.5}), clear_cache=False)
    with pytest.raises(ClientAPIError, match="already called for round 1"):
        flare.send(flare.FLModel(metrics={"accuracy": 0.6}))


def test_second_send_is_an_error_for_a_task_without_a_round(ready: Site) -> None:
    ready.link.offer(task(None, "validate"))
    flare.receive()
    flare.send(flare.FLModel(metrics={"accuracy": 0.5}))
    with pytest.raises(ClientAPIError, match="already called"):
        flare.send(flare.FLModel(metrics={"accuracy": 0.6}))


def test_receive_twice_before_send_returns_the_same_model(ready: Site) -> None:
    ready.link.offer(task(0))
    first = flare.receive()
    second = flare.receive(timeout=0.1)
    assert first is not None and first is second


def test_receive_timeout(ready: Site) -> None:
    started = time.monotonic()
    with pytest.raises(ReceiveTimeoutError) as info:
        flare.receive(timeout=0.2)
    elapsed = time.monotonic() - started
    assert 0.15 <= elapsed < 1.0
    assert isinstance(info.value, TimeoutError)
    assert isinstance(info.value, ClientAPIError)
    assert "receive(timeout=0.2) got no model" in str(info.value)


@pytest.mark.parametrize("timeout", [-1, "5"])
def test_receive_rejects_bad_timeouts(ready: Site, timeout: Any) -> None:
    with pytest.raises(ClientAPIError, match="takes seconds >= 0 or None"):
        flare.receive(timeout=timeout)


def test_is_running_blocks_until_a_task_arrives(ready: Site) -> None:
    worker = FakeWorker(ready.link, [task(0)], delay=0.3)
    worker.start()
    started = time.monotonic()
    assert flare.is_running() is True
    assert time.monotonic() - started >= 0.25
    assert flare.is_running() is True  # the task is still unanswered
    model = flare.receive()
    assert model is not None and model.current_round == 0
    flare.send(flare.FLModel(metrics={"accuracy": 1.0}))
    assert flare.is_running() is False  # the worker stopped the link after one task
    worker.join(5)
    assert flare.receive() is None


def test_stop_ends_is_running_and_receive(ready: Site) -> None:
    ready.link.stop()
    assert flare.is_running() is False
    assert flare.receive() is None
    assert flare.receive(timeout=0.1) is None


# ---------------------------------------------------------------- task kinds


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("train", (True, False, False)),
        ("validate", (False, True, False)),
        ("submit_model", (False, False, True)),
    ],
)
def test_task_kind(ready: Site, name: str, expected: tuple[bool, bool, bool]) -> None:
    ready.link.offer(task(1, name))
    # Asking for the kind first fetches the task; receive() then returns its model.
    assert (flare.is_train(), flare.is_evaluate(), flare.is_submit_model()) == expected
    model = flare.receive()
    assert model is not None and model.current_round == 1
    assert (flare.is_train(), flare.is_evaluate(), flare.is_submit_model()) == expected


def test_task_kind_after_the_job_ended(ready: Site) -> None:
    ready.link.stop()
    assert (flare.is_train(), flare.is_evaluate(), flare.is_submit_model()) == (
        False,
        False,
        False,
    )


# ---------------------------------------------------------------- what send() sends


def test_send_fills_rounds_from_the_received_task(ready: Site) -> None:
    ready.link.offer(task(2, task_id="abc"))
    flare.receive()
    sent = flare.FLModel(params={"dense": [np.ones((2, 2)), np.ones(2)], "pool": []})
    flare.send(sent)
    got = ready.link.wait_result("abc")
    assert got is sent
    assert (got.current_round, got.total_rounds) == (2, 3)


def test_send_keeps_rounds_the_script_set(ready: Site) -> None:
    ready.link.offer(task(2, task_id="abc"))
    flare.receive()
    flare.send(flare.FLModel(metrics={"a": 1.0}, current_round=7, total_rounds=9))
    got = ready.link.wait_result("abc")
    assert (got.current_round, got.total_rounds) == (7, 9)


def test_numpy_scalar_metrics_become_floats(ready: Site) -> None:
    ready.link.offer(task(0, task_id="m"))
    flare.receive()
    metrics = {
        "acc32": np.float32(0.5),
        "steps": np.int64(12),
        "acc64": np.float64(0.25),
        "zero_d": np.array(1.5),
        "plain": 3,
    }
    flare.send(flare.FLModel(metrics=metrics))
    got = ready.link.wait_result("m").metrics
    assert got == {"acc32": 0.5, "steps": 12.0, "acc64": 0.25, "zero_d": 1.5, "plain": 3}
    assert type(got["acc32"]) is float and type(got["steps"]) is float
    assert type(got["zero_d"]) is float
    assert isinstance(got["acc64"], float)


@pytest.mark.parametrize("bad", ["0.9", [0.9], {"a": 1}, None, np.ones(3)], ids=str)
def test_non_numeric_metric_is_refused(ready: Site, bad: Any) -> None:
    ready.link.offer(task(0, task_id="m"))
    flare.receive()
    with pytest.raises(ClientAPIError) as info:
        flare.send(flare.FLModel(metrics={"accuracy": bad}))
    assert "metric 'accuracy' must be a number" in str(info.value)
    assert "float(value)" in str(info.value)
    # Nothing reached the worker, and the script may still send a fixed result.
    flare.send(flare.FLModel(metrics={"accuracy": 0.9}))
    assert ready.link.wait_result("m").metrics == {"accuracy": 0.9}


def test_send_refuses_unsendable_params_and_weights(ready: Site) -> None:
    ready.link.offer(task(0))
    flare.receive()
    with pytest.raises(ClientAPIError) as info:
        flare.send(flare.FLModel(params={"dense": ["not an array"]}))
    assert "send() got an FLModel it cannot send" in str(info.value)
    assert "'dense/0'" in str(info.value)
    with pytest.raises(ClientAPIError, match="NUM_STEPS_CURRENT_ROUND"):
        flare.send(flare.FLModel(metrics={"a": 1.0}, meta={"NUM_STEPS_CURRENT_ROUND": 0}))


def test_send_accepts_meta_param_trees(ready: Site) -> None:
    ready.link.offer(task(0, task_id="s"))
    flare.receive()
    c_diff = {"dense": [np.full((2, 2), -0.5), np.zeros(2)], "pool": []}
    meta = {flare.AlgorithmConstants.SCAFFOLD_CTRL_DIFF: c_diff, "steps": np.int64(12)}
    params = {"dense": [np.ones((2, 2)), np.ones(2)], "pool": []}
    flare.send(flare.FLModel(params=params, meta=meta))
    got = ready.link.wait_result("s")
    assert got.meta["scaffold_c_diff"] is c_diff  # as the script made it
    assert got.meta["steps"] == 12 and type(got.meta["steps"]) is int  # numpy scalar -> int
    # and what the worker does with it: the tree travels as arrays, back as the same tree
    fields, arrays = model_to_wire(got)
    wire = decode(encode(Message("submit", {"model": fields}, arrays)).tobytes())
    back = model_from_wire(wire.fields["model"], list(wire.arrays))
    assert back.meta["steps"] == 12 and back.meta["scaffold_c_diff"]["pool"] == []
    np.testing.assert_array_equal(back.meta["scaffold_c_diff"]["dense"][0], np.full((2, 2), -0.5))


@pytest.mark.parametrize(
    ("meta", "phrase"),
    [
        ({"note": object()}, "FLModel.meta['note'] cannot be sent"),
        ({"c": {"w": np.ones(2), "n": 3}}, "FLModel.meta['c'] cannot be sent"),  # mixed
        ({"c": [np.ones(2), [1 + 2j]]}, "FLModel.meta['c'] cannot be sent"),
        ({1: "x"}, "meta keys must be strings"),
        ({f"c{i}": np.ones(1) for i in range(17)}, "at most 16 can be sent"),
        ({"k" * 300: np.ones(1)}, "1 to 256 characters"),
    ],
)
def test_send_refuses_meta_it_cannot_send(ready: Site, meta: dict[Any, Any], phrase: str) -> None:
    ready.link.offer(task(0, task_id="m"))
    flare.receive()
    with pytest.raises(ClientAPIError) as info:
        flare.send(flare.FLModel(metrics={"a": 1.0}, meta=meta))
    assert phrase in str(info.value)
    flare.send(flare.FLModel(metrics={"a": 1.0}, meta={"ok": [1, 2.5, None]}))
    assert ready.link.wait_result("m").meta == {"ok": [1, 2.5, None]}


# ---------------------------------------------------------------- context


def test_system_info_and_context(ready: Site) -> None:
    assert flare.system_info() == {
        "job_id": "job-42",
        "site_name": "site-2",
        "site_index": 1,
        "num_sites": 3,
    }
    assert flare.get_job_id() == "job-42"
    assert flare.get_site_name() == "site-2"
    config = flare.get_config()
    assert config == CONFIG
    config["num_rounds"] = 99  # a copy: the site's config is unchanged
    assert flare.get_config()["num_rounds"] == 3


def test_get_config_merges_the_current_tasks_config(ready: Site) -> None:
    configured = task(0, task_id="c0")
    configured.model.meta[flare.MetaKey.CONFIG] = {"fedprox_mu": 0.01, "num_rounds": 7}
    ready.link.offer(configured)
    assert flare.get_config() == CONFIG  # no task yet: the job's config alone
    flare.receive()
    merged = flare.get_config()
    assert merged == {**CONFIG, "fedprox_mu": 0.01, "num_rounds": 7}  # the task's key wins
    merged["runner"]["script"] = "other.py"  # a deep copy
    assert flare.get_config()["runner"] == {"script": "train.py"}
    flare.send(flare.FLModel(metrics={"a": 1.0}))
    assert flare.get_config()["fedprox_mu"] == 0.01  # still the last task's until the next
    ready.link.offer(task(1, task_id="c1"))  # a task without a config
    flare.receive()
    assert flare.get_config() == CONFIG
    odd = task(2, task_id="c2")
    odd.model.meta[flare.MetaKey.CONFIG] = [1, 2]  # not an object: ignored (and logged)
    flare.send(flare.FLModel(metrics={"a": 1.0}))
    ready.link.offer(odd)
    flare.receive()
    assert flare.get_config() == CONFIG


# ---------------------------------------------------------------- log


def test_log_forwards_scalars(ready: Site) -> None:
    flare.log("loss", 0.25, global_step=3)
    flare.log("acc", np.float32(0.5), data_type=flare.AnalyticsDataType.METRIC)
    flare.log("train", {"loss": 1, "acc": np.float64(0.75)}, data_type="scalars", global_step=2)
    tb = {"writer": "TORCH_TB", "path": None}
    assert ready.logs == [
        {"key": "loss", "value": 0.25, "data_type": "SCALAR", "step": 3, **tb},
        {"key": "acc", "value": 0.5, "data_type": "METRIC", "step": None, **tb},
        {"key": "train", "value": {"loss": 1.0, "acc": 0.75}, "data_type": "SCALARS", "step": 2,
         **tb},
    ]  # fmt: skip
    assert type(ready.logs[1]["value"]) is float
    assert all(type(v) is float for v in ready.logs[2]["value"].values())


def test_log_rejects_bad_values(ready: Site) -> None:
    with pytest.raises(ClientAPIError, match="value for 'loss' must be a number"):
        flare.log("loss", "high")
    with pytest.raises(ClientAPIError, match="takes a dict of numbers"):
        flare.log("train", 0.5, data_type="SCALARS")
    with pytest.raises(ClientAPIError, match="supports data_type SCALAR, SCALARS"):
        flare.log("img", 0.5, data_type="IMAGE")
    with pytest.raises(ClientAPIError, match="takes an int"):
        flare.log("loss", 0.5, global_step=1.5)  # type: ignore[arg-type]
    assert ready.logs == []


# ---------------------------------------------------------------- clear / shutdown / rank


def test_clear_forgets_the_received_model(ready: Site) -> None:
    ready.link.offer(task(0))
    assert flare.receive() is not None
    flare.clear()
    with pytest.raises(ReceiveTimeoutError):
        flare.receive(timeout=0.05)


def test_shutdown_ends_the_loop(ready: Site) -> None:
    ready.link.offer(task(0))
    assert flare.is_running() is True
    flare.shutdown()
    assert flare.is_running() is False
    assert flare.receive() is None
    assert ready.link.wait_result("t0-train") is None  # the worker sees the script is done


def test_other_ranks_do_not_report(site: Site) -> None:
    flare.init(rank=1)
    site.link.offer(task(0, task_id="r"))
    model = flare.receive()
    assert model is not None
    flare.send(flare.FLModel(params={"dense": [np.ones((2, 2)), np.ones(2)], "pool": []}))
    flare.log("loss", 1.0)
    site.link.stop()
    assert site.link.wait_result("r") is None  # rank 1 sent nothing to the server
    assert site.logs == []


def test_rank_from_environment(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "3")
    flare.init()
    site.link.offer(task(0, task_id="r"))
    flare.receive()
    flare.send(flare.FLModel(metrics={"a": 1.0}))
    site.link.stop()
    assert site.link.wait_result("r") is None


def test_rank_zero_reports(site: Site) -> None:
    flare.init(rank=0)
    site.link.offer(task(0, task_id="r"))
    flare.receive()
    flare.send(flare.FLModel(metrics={"a": 1.0}))
    assert site.link.wait_result("r").metrics == {"a": 1.0}
