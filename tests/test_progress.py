"""Progress a person can read: it moves within a chunk, and its rate leaves out the model's start."""

from __future__ import annotations

from conftest import default_table
from doubles import RecordingFake

from pipeline.runner import run_job


class RecordingBar:
    """A bar with tqdm's interface that remembers what it was told."""

    def __init__(self) -> None:
        self.updates: list[int] = []
        self.start_t = 100.0
        self.last_print_t = 100.0
        self.closed = False

    def update(self, n: int) -> None:
        self.updates.append(n)

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        self.closed = True


class SlowStart(RecordingFake):
    """Loads for 5 seconds (as reported) on its first answer, then answers in steps."""

    def answer(self, prompt, texts, request):
        if not self.starts:
            self.start()
            self.start_seconds += 5.0
        return super().answer(prompt, texts, request)


def test_the_bar_moves_within_a_chunk_and_leaves_out_the_start(make_job) -> None:
    job_files = make_job(default_table(300), chunk_rows=150, fake={"seconds_per_row": 0.0001})
    job = job_files.load()
    bar = RecordingBar()
    run_job(job, backend=SlowStart(job), progress=bar)
    assert sum(bar.updates) == 300 and bar.closed
    # a chunk of 150 rows arrives in many steps, not one jump at its end
    assert len(bar.updates) > 10 and max(bar.updates) < 150
    # the 5 s the model took to load are not labelling time: the bar's clock skips them
    assert (bar.start_t, bar.last_print_t) == (105.0, 105.0)


def test_an_http_backend_moves_the_bar_row_by_row(make_job, monkeypatch) -> None:
    from fault_server import FaultServer

    monkeypatch.setenv("LM_TEST_KEY", "k")
    with FaultServer("k") as server:
        server.down = False
        api = {"base_url": f"http://127.0.0.1:{server.server_port}/v1", "api_key_env": "LM_TEST_KEY"}
        job_files = make_job(default_table(40), chunk_rows=40, backend="openai", model="m", api=api)
        bar = RecordingBar()
        run_job(job_files.load(), progress=bar)
    assert sum(bar.updates) == 40
    assert len(bar.updates) >= 20  # one chunk, answered over many updates
