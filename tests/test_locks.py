"""Two l3zh-local processes sharing an output folder or a cache entry: one waits for the other, or refuses."""

from __future__ import annotations

import json
import threading

from l3zh_local.files import write_text_atomic


def test_atomic_text_writes_from_many_writers_never_collide(tmp_path):
    target = tmp_path / "manifest.json"
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            for i in range(200):
                write_text_atomic(target, json.dumps({"writer": n, "i": i, "pad": "x" * 4096}))
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert json.loads(target.read_text())["i"] == 199
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]
