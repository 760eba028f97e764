"""The agent's trainer thread: what it says about a round it failed, and which queued model it trains."""

from __future__ import annotations

import logging
import shutil
import threading
import time

import pytest

from edge.agent import Agent, AgentConfig, RoundFailed
from protocol.messages import BlobRef, ModelInfo, RoundStart, TrainingInfo


def _start(round_: int) -> RoundStart:
    ref = BlobRef(blob_id="ab" * 16, size=10, sha256=f"{round_:064x}", chunks=1)
    return RoundStart(
        federation="default",
        round=round_,
        base_hash=f"{round_:064x}",
        blob=ref,
        model=ModelInfo(arch="resnet18"),
        training=TrainingInfo(),
        deadline=time.time() + 60,
        selected=["s"],
    )


def _agent(tiny_federation, tmp_path) -> tuple[Agent, list[tuple[str, int | None, object]], list[int]]:
    """An agent that never connects: its states (with what it was working on at that moment) and the
    rounds it trains are recorded; training fails."""
    cfg = AgentConfig(site="s", data=tiny_federation / "sites" / "site01", state_dir=tmp_path)
    agent = Agent(cfg)
    states: list[tuple[str, int | None, object]] = []
    trained: list[int] = []

    def set_state(state: str, round_: int | None = None, reason: str = "") -> None:
        states.append((state, round_, agent.working))

    def train_round(start: RoundStart, blob: bytes, fetch_seconds: float) -> None:
        trained.append(start.round)
        raise RoundFailed("the data set folder is gone")

    agent.endpoint.set_state = set_state  # type: ignore[method-assign]
    agent._train_round = train_round  # type: ignore[method-assign]
    return agent, states, trained


def test_a_site_is_idle_before_it_says_it_failed_a_round(tiny_federation, tmp_path):
    """The aggregator restarts a round the moment a needed site fails and selects that site again: the
    restart must find the site idle, not still `working` on the round (it ignored the restart and sat
    out the deadline)."""
    agent, states, trained = _agent(tiny_federation, tmp_path)
    start = _start(3)
    agent.working = ("", start.round, start.base_hash, True)
    agent.jobs.put((start, b"", 0.0))
    trainer = threading.Thread(target=agent._trainer, daemon=True)
    trainer.start()
    deadline = time.monotonic() + 30
    while len(states) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    agent.jobs.put(None)
    trainer.join(timeout=30)
    assert trained == [3] and not trainer.is_alive()
    assert states == [("training", 3, ("", 3, start.base_hash, True)), ("failed", 3, None)]


def test_models_that_queued_while_the_site_trained_leave_only_the_newest(tiny_federation, tmp_path):
    """A slow site: rounds 1, 2 and 3 arrived while it trained round 0. It trains round 3 next and keeps
    none of the older models (the queue held one global model per round, without limit)."""
    agent, _, _ = _agent(tiny_federation, tmp_path)
    for r in (1, 2, 3):
        agent.jobs.put((_start(r), b"model %d" % r, 0.0))
    job = agent._next_job()
    assert job is not None and job[0].round == 3 and job[1] == b"model 3"
    assert agent.jobs.empty()
    agent.jobs.put((_start(4), b"", 0.0))
    agent.jobs.put(None)  # stopping wins over a model still waiting
    assert agent._next_job() is None


def test_the_main_loop_survives_an_error_in_its_periodic_work_and_says_it_once(
    tiny_federation, tmp_path, caplog
):
    agent, _, _ = _agent(tiny_federation, tmp_path)

    def broken() -> None:
        raise MemoryError("a list of 10^12 missing chunks")

    agent._request_missing = broken  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR, logger="edge.agent"):
        for _ in range(3):
            agent._tick()  # (it used to end the agent's main loop, at every start)
    said = [r for r in caplog.records if "periodic work failed" in r.getMessage()]
    assert len(said) == 1 and "10^12" in said[0].getMessage()


def test_training_images_that_vanish_between_rounds_fail_the_round_in_one_line(tiny_federation, tmp_path):
    """The site's file list is read once: when its folder is unmounted or moved later, the round fails
    with one line instead of a warning for each of its (thousands of) images."""
    shutil.copytree(tiny_federation / "sites" / "site01", tmp_path / "data")
    cfg = AgentConfig(site="s", data=tmp_path / "data", state_dir=tmp_path / "state")
    agent = Agent(cfg)
    assert agent._site(_start(0)).num_train_images > 0
    (tmp_path / "data").rename(tmp_path / "away")
    with pytest.raises(RoundFailed, match=r"the site's training images are gone \(.*data.* not found\)"):
        agent._site(_start(1))
    (tmp_path / "away").rename(tmp_path / "data")
    assert agent._site(_start(2)).num_train_images > 0  # back: the next round trains


def test_a_state_folder_that_cannot_be_written_fails_the_round_before_training(
    tiny_federation, tmp_path, monkeypatch
):
    """A read-only or full state folder: the site trained the whole round and then failed to keep its
    classifier, with a traceback, every round. It now fails at once, in one line."""
    import edge.agent as agent_module

    agent = Agent(AgentConfig(site="s", data=tiny_federation / "sites" / "site01", state_dir=tmp_path))

    def read_only(path, data):
        raise OSError(30, "Read-only file system", str(path))

    monkeypatch.setattr(agent_module, "atomic_write", read_only)
    monkeypatch.setattr(agent, "_received_model", lambda *a: pytest.fail("trained anyway"))
    with pytest.raises(RoundFailed, match=r"the state folder cannot be written: .*Read-only file system"):
        agent._train_round(_start(0), b"", 0.0)


def test_an_update_lost_before_its_ack_is_trained_again_not_waited_for(tiny_federation, tmp_path, caplog):
    """The pending update's files lost (deleted, or a restored backup) after training: the site took the
    round for settled and stayed silent, and a round with quorum = every site restarted forever
    (2026-12-05 chaos audit). It trains the round again; a settled round stays settled."""
    from edge.agent import Progress
    from protocol.messages import encode_message

    agent, _, _ = _agent(tiny_federation, tmp_path)
    start = _start(3)
    agent._save_progress(Progress(3, start.base_hash, False, "", settled=False))
    again = Agent(agent.cfg)  # (after a restart: the progress as persisted)
    assert again.progress == agent.progress and again.upload is None
    again.endpoint.set_state = agent.endpoint.set_state  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING):
        again._on_round("round", encode_message(start))
    assert again.fetch is not None and again.working == ("", 3, start.base_hash, True)
    assert "this round's update was lost before it was acknowledged: training again" in caplog.text
    settled = Agent(agent.cfg)
    settled._save_progress(Progress(3, start.base_hash, True, ""))
    settled._on_round("round", encode_message(start))
    assert settled.fetch is None and settled.working is None


def test_a_full_disk_when_a_round_is_announced_is_a_failed_status(tiny_federation, tmp_path, caplog):
    """A new run's round 0 announced while the site's disk was full: the handler raised (one 'handler
    failed' line), the site said nothing, and the round waited out its deadline for it."""
    from protocol.messages import encode_message

    agent, states, _ = _agent(tiny_federation, tmp_path)

    def full(progress) -> None:
        raise OSError(28, "No space left on device")

    agent._save_progress = full  # type: ignore[method-assign]
    start = _start(0).model_copy(update={"run_id": "ab" * 16})
    with caplog.at_level(logging.WARNING):
        agent._on_round("round", encode_message(start))
    assert states == [("failed", 0, None)]
    assert "cannot take part in round 0: [Errno 28] No space left on device" in caplog.text


def test_an_evaluation_round_and_a_training_round_of_one_round_and_base_are_two_rounds(
    tiny_federation, tmp_path
):
    """A run extended after its evaluation round: training round R has the evaluation round R's number
    and base. The site keyed its work on (round, base_hash), took the training round for the evaluation
    round announced again and did not train it (until a deadline extension came): docs/protocol.md keys
    rounds on (round, base_hash, train)."""
    agent, _, _ = _agent(tiny_federation, tmp_path)
    training = _start(5).model_copy(update={"selected": ["s"]})
    evaluation = training.model_copy(update={"train": False})
    agent.working = ("", 5, evaluation.base_hash, False)  # fetching the evaluation round's model
    agent._on_round_start(training)
    assert agent.working == ("", 5, training.base_hash, True)
    assert agent.fetch is not None and agent.fetch.start == training
    agent._on_round_start(training.model_copy(update={"deadline": training.deadline + 60}))  # extension
    assert agent.fetch.start.deadline == training.deadline + 60 and agent.working[3] is True


def test_a_retained_run_end_without_run_id_ends_no_site(tiny_federation, tmp_path):
    """A retained RunEnd ends only a site of the run it names; one that names none (`run_id` left out,
    as a third-party aggregator may) ended a site that had not taken part in any run yet."""
    from protocol.messages import RunEnd, encode_message

    agent, _, _ = _agent(tiny_federation, tmp_path)
    agent.cfg.exit_when_done = True
    end = encode_message(RunEnd(federation="default", rounds=3))
    agent.endpoint.retained_message = True  # (delivered as the site subscribed)
    agent._on_round("round", end)
    assert not agent.done.is_set()
    agent.endpoint.retained_message = False  # sent while the site listens: the run is over
    agent._on_round("round", end)
    assert agent.done.is_set()


def test_the_rounds_preprocessing_is_what_the_site_trains_with(tiny_federation, tmp_path):
    """ModelInfo carries the normalisation and the jitter (a config's `input.mean` reached the deployed
    contract but no site: sites trained with ImageNet's statistics); left out, the defaults hold."""
    from reid.data import InputSpec

    agent, _, _ = _agent(tiny_federation, tmp_path)
    start = _start(0)
    assert agent._site(start).input_spec == InputSpec(height=256, width=128)
    custom = ModelInfo(
        arch="resnet18", height=64, width=32, mean=[0.5, 0.5, 0.5], std=[0.25, 0.5, 1.0], pad=3
    )
    spec = agent._site(start.model_copy(update={"model": custom})).input_spec
    assert (spec.mean, spec.std, spec.pad_pixels, spec.height) == ((0.5, 0.5, 0.5), (0.25, 0.5, 1.0), 3, 64)


def test_a_dp_spend_whose_update_never_left_the_site_is_not_counted(tiny_federation, tmp_path):
    """A kill between the DP noise (the ledger written) and the pending files counted the round twice:
    once for the update that never left the site, once when the restarted site trained it again. The
    spend is staged until its update is pending; a restart without that update takes it back."""
    from protocol.chunks import blob_ref
    from protocol.messages import UpdateManifest
    from reid.privacy import DPConfig

    cfg = AgentConfig(
        site="s", data=tiny_federation / "sites" / "site01", state_dir=tmp_path, dp=DPConfig(enabled=True)
    )
    start = _start(3)
    agent = Agent(cfg)
    first = agent._spend_privacy(start)
    assert agent._privacy_doc()["rounds"] == 1 and first > 0
    assert Agent(cfg)._privacy_doc() == {"rounds": 0, "epsilon": 0.0, "delta": 1e-5}  # killed: never sent
    agent = Agent(cfg)
    assert agent._spend_privacy(start) == first  # the round trained again costs what it cost once
    blob = b"noised delta"
    manifest = UpdateManifest(
        site="s", round=3, base_hash=start.base_hash, blob=blob_ref(blob, 1024), n_samples=1, cdw=0,
        loss=0, train_seconds=0, dp_epsilon=first,
    )  # fmt: skip
    agent._keep_pending(manifest, blob)
    assert "staged" not in agent._privacy_doc() and agent._privacy_doc()["rounds"] == 1
    assert Agent(cfg)._privacy_doc()["rounds"] == 1  # released: it stays counted after a restart


def test_an_ack_settles_the_update_it_names_by_site_round_and_blob(tiny_federation, tmp_path):
    """An ack names (site, round, blob_id); the site matched on blob_id alone, so an ack of another round
    naming the same blob settled the pending update (2026-12-04 spec re-audit)."""
    from protocol.chunks import blob_ref
    from protocol.messages import UpdateAck, UpdateManifest, encode_message

    agent, _, _ = _agent(tiny_federation, tmp_path)
    blob = b"a delta"
    manifest = UpdateManifest(
        site="s", round=3, base_hash="3" * 64, blob=blob_ref(blob, 1024), n_samples=1, cdw=0, loss=0,
        train_seconds=0,
    )  # fmt: skip
    agent._keep_pending(manifest, blob)
    ack = UpdateAck(site="s", round=2, blob_id=manifest.blob.blob_id, accepted=True)
    agent._on_ack("ack", encode_message(ack))
    assert agent.upload is not None  # another round's ack: still pending
    agent._on_ack("ack", encode_message(ack.model_copy(update={"round": 3})))
    assert agent.upload is None


def _slow_training(agent: Agent) -> threading.Event:
    """Make the agent's training a 30 s loop of batches, each checked as a real one is (`_trained`);
    the event is set once it began."""
    began = threading.Event()

    def train_round(start: RoundStart, blob: bytes, fetch_seconds: float) -> None:
        began.set()
        for i in range(3000):  # 30 s unless stopped or abandoned
            agent._trained(start, i, 3000)
            time.sleep(0.01)

    agent._train_round = train_round  # type: ignore[method-assign]
    return began


def test_a_new_run_abandons_the_old_runs_fetch_and_training(tiny_federation, tmp_path, caplog):
    """docs/protocol.md rule 0: a RoundStart of another run drops the old run's work in hand. The site
    kept training the old run's round (its update answered a run that was over) and took the new run's
    announcement of the same round and base for that job (rule 2), so the new run's settings never
    counted; the old job's end then cleared the new job's key."""
    agent, states, _ = _agent(tiny_federation, tmp_path)
    old = _start(2).model_copy(update={"run_id": "aa" * 16})
    new = old.model_copy(update={"run_id": "bb" * 16})
    agent._on_round_start(old)
    assert agent.fetch is not None and agent.working == ("aa" * 16, 2, old.base_hash, True)
    agent._on_round_start(new)  # the old run's fetch is given up for the new run's
    assert agent.fetch is not None and agent.fetch.start.run_id == "bb" * 16
    assert agent.working == ("bb" * 16, 2, new.base_hash, True)

    agent._on_round_start(old.model_copy(update={"run_id": "cc" * 16}))  # (a third run: trains)
    agent.fetch.transfer.close()
    agent.fetch = None  # its model arrived: the trainer has it
    training = _slow_training(agent)
    job = old.model_copy(update={"run_id": "cc" * 16})
    agent.jobs.put((job, b"", 0.0))
    trainer = threading.Thread(target=agent._trainer, daemon=True)
    with caplog.at_level(logging.INFO, logger="edge.agent"):
        trainer.start()
        assert training.wait(10)
        agent._on_round_start(new.model_copy(update={"run_id": "dd" * 16}))
        deadline = time.monotonic() + 10
        while states[-1][0] != "online" and time.monotonic() < deadline:
            time.sleep(0.01)
    agent.jobs.put(None)
    trainer.join(timeout=30)
    assert "round 2 of the previous run abandoned: a new run started" in caplog.text
    assert states[-1] == ("online", 2, ("dd" * 16, 2, new.base_hash, True))  # the new job kept its key
    assert agent.fetch is not None and agent.fetch.start.run_id == "dd" * 16


def test_a_round_announced_after_the_one_in_hand_abandons_it(tiny_federation, tmp_path, caplog):
    """A site stopped (SIGSTOP, a suspended VM) while it held round 2's model: resumed, it trained round
    2 to the end and uploaded an update the aggregator rejected, though round 3 was already announced
    (2026-12-05 chaos audit F6). A newer round closes the older one: its fetch and training stop."""
    agent, states, _ = _agent(tiny_federation, tmp_path)
    two = _start(2)
    agent._on_round_start(two)
    assert agent.fetch is not None
    three = _start(3).model_copy(update={"selected": ["another"]})
    agent._on_round_start(three)  # not selected for 3: round 2's transfer is not worth finishing
    assert agent.fetch is None and agent.working is None

    training = _slow_training(agent)
    agent.jobs.put((_start(4), b"", 0.0))
    trainer = threading.Thread(target=agent._trainer, daemon=True)
    with caplog.at_level(logging.INFO, logger="edge.agent"):
        agent._on_round_start(_start(4).model_copy(update={"selected": ["another"]}))
        trainer.start()
        assert training.wait(10)
        time.sleep(0.1)
        assert trainer.is_alive() and states[-1][0] == "training"  # round 4 is the newest: it trains
        agent._on_round_start(_start(5).model_copy(update={"selected": ["another"]}))
        deadline = time.monotonic() + 10
        while states[-1][0] != "online" and time.monotonic() < deadline:
            time.sleep(0.01)
    agent.jobs.put(None)
    trainer.join(timeout=30)
    assert "round 4 abandoned: round 5 is announced (it closed)" in caplog.text
    assert states[-1][:2] == ("online", 4)
