"""Seeded fuzzing of every input surface (config.json, tokenizer.model, dense header and body, manifest,
pool, config TOML, CLI sampling arguments, profiles for `report`, GGUF files, HTTP requests): a damaged
input ends in a one-line error (a 4xx with OpenAI's error body) or is taken with unchanged results,
never another exception, a hang, or silently different results where a checksum should catch them.
The long campaign is scripts/fuzz_campaign.py."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz_surfaces import SURFACES, make_base

CASES_PER_SURFACE = 15


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("fuzz-base"))


@pytest.mark.parametrize("surface", SURFACES)
def test_damaged_input_is_refused_in_one_line_or_harmless(base, tmp_path, surface):
    outcomes = []

    @settings(max_examples=CASES_PER_SURFACE, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(seed=st.integers(0, 2**32 - 1))
    def case(seed):
        outcome, detail = SURFACES[surface](base, tmp_path, np.random.default_rng(seed))
        outcomes.append(outcome)
        assert outcome in ("clean", "accepted", "unchecked"), f"seed {seed}: {outcome} {detail}"

    case()
    assert "clean" in outcomes  # the mutators do damage that must be refused
