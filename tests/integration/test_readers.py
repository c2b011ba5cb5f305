"""Reader lifecycle through the management API: create (loading → live), config, delete, write-back."""

from __future__ import annotations

from typing import Any

import yaml

from tests.helpers import echo_reader, process_alive, wait_until


def test_create_reader_goes_loading_then_live_then_delete(liftoff: Any) -> None:
    server = liftoff(readers={"base": echo_reader()}).start()
    created = server.http.post(server.mgmt + "/reader", json=echo_reader("extra", load_delay_ms=1500))
    assert created.status_code == 201, created.text
    reader_id = created.json()["reader_id"]
    loading = server.readers("loading")
    assert reader_id in loading
    assert loading[reader_id]["consumer_groups"] == ["extra"]
    pid = loading[reader_id]["pids"][0]
    assert process_alive(pid)
    server.track_pids()

    wait_until(lambda: reader_id in server.readers("live"), what="the new reader to be live")
    assert server.generate("one two", consumer_group="extra").json() == {"text": "one two"}

    config = server.http.get(server.mgmt + f"/config/{reader_id}")
    assert config.status_code == 200
    assert config.json()["model_name"] == "echo"
    assert config.json()["consumer_group"] == "extra"

    deleted = server.http.delete(server.mgmt + f"/reader/{reader_id}")
    assert deleted.status_code == 204
    assert deleted.content == b""
    assert not process_alive(pid)
    status = server.status()["status"]
    assert all(reader_id not in status[key] for key in ("live_readers", "loading_readers", "dead_readers"))
    # The group is gone: requests to it are refused at once, not queued.
    assert server.generate("x", consumer_group="extra").status_code == 404


def test_unknown_reader_is_404(liftoff: Any) -> None:
    server = liftoff().start(wait=None)
    for response in (
        server.http.delete(server.mgmt + "/reader/nope"),
        server.http.get(server.mgmt + "/config/nope"),
        server.http.get(server.mgmt + "/reader/nope"),
    ):
        assert response.status_code == 404
        assert "nope" in response.json()["detail"]
        assert response.json()["error_type"] == "not_found"


def test_invalid_reader_config_names_the_field(liftoff: Any) -> None:
    server = liftoff().start(wait=None)
    cases = [
        ({"model_name": "echo", "device": "gpu"}, "device", 422),
        ({"device": "cpu"}, "model_name", 422),
        ({"model_name": "echo", "device": "cpu", "max_batch_size": "big"}, "max_batch_size", 422),
        ({"model_name": "echo", "device": "cpu", "max_batch_sise": 4}, "max_batch_sise is not a field", 400),
        ({"model_name": "echo", "device": "cpu", "max_batch_size": 10**6}, "from 1 to 1024", 400),
        ({"model_name": "echo", "device": "cpu", "tensor_parallel": 2}, "tensor_parallel", 422),
        ({"model_name": "echo", "device": "cuda", "cuda_visible_devices": "zero"}, "cuda_visible_devices", 422),
    ]
    for body, field, status in cases:
        response = server.http.post(server.mgmt + "/reader", json=body)
        assert response.status_code == status, (body, response.text)
        assert field in response.json()["detail"], (field, response.text)
    assert server.status()["status"]["loading_readers"] == {}


def test_reader_that_fails_to_load_is_dead_with_reason(liftoff: Any) -> None:
    server = liftoff(readers={"ok": echo_reader("good")}).start()
    created = server.http.post(server.mgmt + "/reader", json=echo_reader("bad", fail_load="weights are corrupt"))
    reader_id = created.json()["reader_id"]
    wait_until(lambda: reader_id in server.readers("dead"), what="the broken reader to be dead")
    detail = server.http.get(server.mgmt + f"/reader/{reader_id}").json()
    assert detail["state"] == "dead"
    assert "weights are corrupt" in detail["error"]
    assert server.readers("dead")[reader_id]["pids"] == []
    assert server.generate("still", consumer_group="good").json() == {"text": "still"}
    assert server.generate("x", consumer_group="bad").status_code == 503
    assert "weights are corrupt" in server.log()


def test_unsupported_options_are_reported(liftoff: Any) -> None:
    server = liftoff(readers={"r": echo_reader(page_cache_size="5GB", disable_cuda_graph=1)}).start()
    detail = server.http.get(server.mgmt + "/reader/r").json()
    assert any(note.startswith("page_cache_size='5GB' is accepted but has no effect") for note in detail["notes"])
    assert any(note.startswith("disable_cuda_graph=1") for note in detail["notes"])
    assert "page_cache_size" in server.log()


def test_created_and_deleted_readers_are_written_back(liftoff: Any) -> None:
    server = liftoff(readers={"keep": echo_reader()}).start()
    path = server.config_path
    path.write_text("# operators' comment\n" + path.read_text())
    created = server.http.post(server.mgmt + "/reader", json=echo_reader("more", batch=3))
    reader_id = created.json()["reader_id"]
    manifest = yaml.safe_load(path.read_text())["takeoff"]
    assert set(manifest["readers_config"]) == {"keep", reader_id}
    assert manifest["readers_config"][reader_id]["max_batch_size"] == 3
    assert manifest["server_config"]["port"] == server.ports["port"]
    assert path.read_text().startswith("# operators' comment")

    assert server.http.delete(server.mgmt + f"/reader/{reader_id}").status_code == 204
    manifest = yaml.safe_load(path.read_text())["takeoff"]
    assert set(manifest["readers_config"]) == {"keep"}


def test_reader_in_two_groups_serves_both(liftoff: Any) -> None:
    server = liftoff(readers={"both": echo_reader("a,b")}).start()
    for group in ("a", "b"):
        response = server.generate("hi there", consumer_group=group, return_metadata=True)
        assert response.json()["text"] == "hi there"
        assert response.json()["metadata"]["reader_id"] == "both"


def test_two_readers_share_a_group(liftoff: Any) -> None:
    readers = {"r1": echo_reader(delay_ms=20, batch=2), "r2": echo_reader(delay_ms=20, batch=2)}
    server = liftoff(readers=readers).start()
    server.wait_live(2)
    import concurrent.futures

    prompts = [f"w{i} " * 5 for i in range(12)]
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(lambda p: server.generate(p, return_metadata=True).json(), prompts))
    assert [r["text"] for r in responses] == prompts
    served_by = [r["metadata"]["reader_id"] for r in responses]
    assert served_by.count("r1") >= 3
    assert served_by.count("r2") >= 3


def test_unknown_model_is_dead_with_advice(liftoff: Any) -> None:
    server = liftoff(env={"HF_HUB_OFFLINE": "1"}, server={"allowed_models": ["nobody/*"], "allow_downloads": True})
    server.start(wait=None)
    created = server.http.post(server.mgmt + "/reader", json={"model_name": "nobody/nothing", "device": "cpu"})
    reader_id = created.json()["reader_id"]
    wait_until(lambda: reader_id in server.readers("dead"), what="the reader without a model to be dead")
    error = server.http.get(server.mgmt + f"/reader/{reader_id}").json()["error"]
    assert "nobody/nothing" in error
    assert "cannot be reached" in error
    assert "smollm2-135m-instruct" in error
