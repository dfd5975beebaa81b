from __future__ import annotations

import pytest

from tests.faults.ledger import FaultLedger, ledger_path


@pytest.fixture
def fault_ledger(request: pytest.FixtureRequest) -> FaultLedger:
    """Where a fault test records what it injected and how it ended (see ledger.py)."""
    return FaultLedger(request.node.nodeid, ledger_path())
