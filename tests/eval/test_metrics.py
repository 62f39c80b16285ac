"""MetricsLogger, read_metrics and round_table on a temporary run directory."""
import json

from rich.console import Console

from pipeline.eval.metrics import MetricsLogger, read_metrics, round_table


def _lines(run_dir):
    return (run_dir / "metrics.jsonl").read_text().splitlines()


def test_log_writes_one_flushed_json_line_per_event(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=False)
    logger.log("run", status="started", round=0)
    # Readable before close: every event is flushed as it is written.
    assert json.loads(_lines(tmp_path)[0])["status"] == "started"
    logger.log("eval", round=0, tier="low", top_k=1, accuracy=0.5, loss=1.2, per_family={"a": 0.5})
    logger.close()
    events = read_metrics(tmp_path)
    assert [e["event"] for e in events] == ["run", "eval"]
    assert events[1]["per_family"] == {"a": 0.5}
    assert all(isinstance(e["time"], float) for e in events)
    assert list(events[1])[0] == "event" and list(events[1])[-1] == "time"


def test_offset_is_the_file_size(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        assert logger.offset() == 0
        logger.log("run", status="started")
        assert logger.offset() == (tmp_path / "metrics.jsonl").stat().st_size > 0


def test_resume_offset_drops_exactly_the_later_lines(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=False)
    for round_ in range(3):
        logger.log("round", round=round_, seconds=1.0)
    checkpoint_offset = logger.offset()
    kept = _lines(tmp_path)
    logger.log("round", round=3, seconds=1.0)
    logger.log("client", round=4, client=0, train_loss=1.0)
    logger.close()
    assert len(_lines(tmp_path)) == 5

    resumed = MetricsLogger(tmp_path, resume_offset=checkpoint_offset, tensorboard=False)
    assert _lines(tmp_path) == kept
    resumed.log("run", status="resumed", round=3)
    resumed.close()
    assert [e.get("round") for e in read_metrics(tmp_path)] == [0, 1, 2, 3]
    assert read_metrics(tmp_path)[-1]["status"] == "resumed"


def test_read_metrics_skips_a_torn_last_line(tmp_path):
    good = [{"event": "round", "round": 1, "time": 1.0}, {"event": "round", "round": 2, "time": 2.0}]
    text = "".join(json.dumps(e) + "\n" for e in good) + '{"event": "round", "rou'
    (tmp_path / "metrics.jsonl").write_text(text)
    assert read_metrics(tmp_path) == good


def test_appending_after_a_torn_line_does_not_glue_events(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"event": "run", "time": 1}\n{"event": "ro')
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log("run", status="started")
    assert [e.get("status") for e in read_metrics(tmp_path)] == [None, "started"]


def test_read_metrics_of_a_missing_file_is_empty(tmp_path):
    assert read_metrics(tmp_path) == []


def test_tensorboard_gets_eval_and_client_scalars(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=True)
    logger.log("eval", round=1, tier="low", top_k=1, accuracy=0.5, loss=1.0, per_family={"boolq": 0.4})
    logger.log("client", round=1, client=3, tier="low", top_k=1, train_loss=2.0, steps=3)
    logger.log("reject", round=1, client=4, reason="nan")
    logger.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"eval/accuracy/low", "eval/loss/low", "eval/per_family/boolq/low",
            "client/train_loss/low/client_3"} <= tags
    assert not any("top_k" in t or "round" in t for t in tags)
    (point,) = acc.Scalars("eval/accuracy/low")
    assert (point.step, point.value) == (1, 0.5)


def test_round_table_renders_changes(tmp_path):
    evals = [{"tier": "low", "top_k": 1, "accuracy": 0.30, "loss": 1.5},
             {"tier": "high", "top_k": 4, "accuracy": 0.40, "loss": 1.1},
             {"tier": "new", "top_k": 2, "accuracy": 0.35}]
    table = round_table(evals, {"low": 0.25, "high": 0.45}, chance=0.25)
    console = Console(record=True, width=100, color_system="truecolor")
    console.print(table)
    text = console.export_text()
    for expected in ("low", "high", "30.00%", "+5.00 pp", "-5.00 pp", "1.5000", "chance accuracy 25.0%"):
        assert expected in text
    assert table.row_count == 3
    # Gains are green, losses red.
    styles = [str(cell.style) for cell in table.columns[3]._cells]
    assert styles[:2] == ["green", "red"]
    Console(record=True).print(round_table(evals, None, None))
