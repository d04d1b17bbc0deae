"""``iop-fhir demo``: a real process that loads a cohort, prints working examples, and serves them."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests

from iop_fhir.serve import free_port

pytestmark = pytest.mark.integration


def test_demo_serves_the_cohort_it_prints(launch: Callable[..., Any]) -> None:
    port = free_port()
    server = launch("demo", "--patients", "2", "--port", str(port), "--seed", "5", port=port)
    output = server.output()
    assert "Loaded 2 IOP records" in output
    assert f"FHIR base: http://127.0.0.1:{port}/fhir" in output
    urls = re.findall(r"curl -s (?:-H '[^']*' )?'([^']+)'", output)
    assert len(urls) == 6, output  # each once: no buffered output repeated by the forked workers
    for url in urls[:5]:  # metadata, Patient search, include, $medication-history, XML read
        response = requests.get(url, timeout=30)
        assert response.status_code == 200, (url, response.text[:500])
    history = requests.get(urls[3], timeout=30).json()
    assert history["resourceType"] == "Bundle"
    assert any(e["resource"]["resourceType"] == "MedicationRequest" for e in history.get("entry", []))

    server.process.terminate()
    server.process.wait(30)
    (database,) = re.findall(r"into (\S+demo\.sqlite)", output)
    assert not Path(database).exists(), "the demo removes its database when it stops"
