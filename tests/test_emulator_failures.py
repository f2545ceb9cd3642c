"""Instance failure as SGLang fails: the whole instance dies (connections reset, socket
closed, no 503) and, when asked to, listens again on the same port, fresh."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from tests.emulator_harness import (
    EmulatorServer,
    connection_fate,
    get,
    make_emulator,
    post,
    wait_for_fate,
    wait_for_load,
)


def _requests(url: str) -> list[dict]:
    status, body = get(url + "/admin/requests")
    assert status == 200
    return list(body["requests"])


def test_die_resets_open_connections_refuses_new_ones_and_stays_down():
    with EmulatorServer(make_emulator()) as s:
        assert post(s.url + "/generate", {"text": "before"})[0] == 200
        post(s.url + "/admin/ranks/0", {"mode": "hang"})
        with ThreadPoolExecutor(1) as pool:
            held = pool.submit(
                connection_fate, s.url + "/generate", {"text": "x", "routed_dp_rank": 0}
            )
            wait_for_load(s.url, 0, num_waiting_reqs=1)
            # the admin request itself is answered; every other connection is reset
            # ... and says what the instance had finished when it died
            assert post(s.url + "/admin/instance", {"mode": "die"}) == (
                200,
                {"mode": "die", "restart_after_s": None, "finished_reqs": 1},
            )
            assert held.result() == "reset"
        wait_for_fate(s.url + "/health", "refused")
        assert connection_fate(s.url + "/generate", {"text": "after"}) == "refused"
    # the harness still stops the (dead) emulator cleanly on exit


def test_die_with_a_restart_listens_again_on_the_same_port_with_fresh_state():
    with EmulatorServer(make_emulator()) as s:
        assert post(s.url + "/generate", {"text": "kept in the log", "rid": "old"})[0] == 200
        post(s.url + "/admin/ranks/3", {"mode": "hang"})
        post(s.url + "/admin/config", {"time_scale": 5.0})
        status, body = post(s.url + "/admin/instance", {"mode": "die", "restart_after_s": 0.2})
        assert (status, body["restart_after_s"]) == (200, 0.2)
        wait_for_fate(s.url + "/health", "answered 200")
        # a fresh instance: every rank ok, nothing in flight, the configured time scale
        assert get(s.url + "/admin/ranks")[1]["modes"] == ["ok"] * 4
        assert get(s.url + "/admin/config")[1] == {"time_scale": 0.0}
        assert all(
            row["emulator"]["finished_reqs"] == 0 for row in get(s.url + "/v1/loads")[1]["loads"]
        )
        assert post(s.url + "/generate", {"text": "new", "routed_dp_rank": 3})[0] == 200
        # the request log belongs to the process: it spans the restart
        assert [r["rid"] for r in _requests(s.url)][0] == "old"


def test_a_request_pinned_to_a_failed_rank_takes_the_instance_down():
    with EmulatorServer(make_emulator()) as s:
        # an idle failed rank is skipped by round robin (SGLang's inactive worker)
        post(s.url + "/admin/ranks/2", {"mode": "fail", "restart_after_s": 0.2})
        ranks = {
            post(s.url + "/generate", {"text": "x"})[1]["meta_info"]["dp_rank"] for _ in range(6)
        }
        assert ranks == {0, 1, 3}
        # pinned to it: SGLang's DP controller raises ValueError and the server goes down
        assert connection_fate(s.url + "/generate", {"text": "x", "routed_dp_rank": 2}) == "reset"
        wait_for_fate(s.url + "/health", "answered 200")  # restarted, as the switch asked
        assert get(s.url + "/admin/ranks")[1]["modes"] == ["ok"] * 4
        crashed = _requests(s.url)[-1]
        assert (crashed["dp_rank"], crashed["outcome"]) == (None, "error")
        assert crashed["error"] == "DP rank 2 is not active."


def test_failing_a_rank_with_requests_in_flight_takes_the_instance_down():
    with EmulatorServer(make_emulator(capacity=1, time_scale=1e6)) as s:
        with ThreadPoolExecutor(3) as pool:
            on_rank = [
                pool.submit(
                    connection_fate, s.url + "/generate", {"text": "x", "routed_dp_rank": 3}
                )
                for _ in range(2)
            ]
            elsewhere = pool.submit(
                connection_fate, s.url + "/generate", {"text": "y", "routed_dp_rank": 0}
            )
            wait_for_load(s.url, 3, num_running_reqs=1, num_waiting_reqs=1)
            wait_for_load(s.url, 0, num_running_reqs=1)
            status, body = post(s.url + "/admin/ranks/3", {"mode": "fail"})
            assert (status, body["instance"]) == (200, "down")
            # a lost GPU ends the whole instance: every request is cut, none gets a 503
            assert [f.result() for f in on_rank] == ["reset", "reset"]
            assert elsewhere.result() == "reset"
        wait_for_fate(s.url + "/health", "refused")


def test_admin_instance_checks_its_body():
    with EmulatorServer(make_emulator()) as s:
        for body in ({"mode": "restart"}, {"mode": "die", "restart_after_s": -1}, [1]):
            assert post(s.url + "/admin/instance", body)[0] == 400
        assert post(s.url + "/admin/instance", b"{not json")[0] == 400
        assert get(s.url + "/health")[0] == 200
