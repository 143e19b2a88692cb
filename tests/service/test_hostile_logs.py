"""A client's path cannot forge lines in the text log.

uvicorn hands the app the percent-decoded path, so `GET /v2/models/a%0a<fake line>/ready`
wrote a second, made-up log line (a fake timestamp and logger included) into the text log.
"""

from __future__ import annotations

from tests.service.conftest import captured_log

FORGED = "2026-12-01 09:00:00,000 INFO service.access FAKE admin login ok"


def test_control_characters_in_the_path_are_escaped_in_the_text_access_line(client):
    with captured_log("text", "service.access") as stream:
        r = client.get("/v2/models/a%0a" + FORGED.replace(" ", "%20") + "%1b%5b31m/ready")
    assert r.status_code == 404
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1, lines  # one request, one line
    assert f"GET /v2/models/a\\n{FORGED}\\x1b[31m/ready 404" in lines[0]
    assert not any(line.startswith(FORGED) for line in lines)
