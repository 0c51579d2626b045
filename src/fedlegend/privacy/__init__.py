"""Differential privacy for heterogeneous adapters (issue 16; docs/privacy.md).

User-level DP, central model with client-side clipping (or local noise): `support` says which
methods' aggregation is a sum and refuses the others, `mechanism` clips and noises,
`accountant` turns the rounds into (epsilon, delta) with Opacus's RDP accountant, `hooks` is
what the engines call.
"""

from .accountant import PrivacyBudgetError, calibrate, epsilon, rounds_within
from .hooks import Settings, device_side, last_round, record_fields, server_side, settings
from .support import RULES, refusal

__all__ = ["PrivacyBudgetError", "RULES", "Settings", "calibrate", "device_side", "epsilon", "last_round",
           "record_fields", "refusal", "rounds_within", "server_side", "settings"]
