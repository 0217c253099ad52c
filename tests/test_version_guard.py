"""The TRL integration's version guard: a warning naming the tested range outside it, an
error naming a missing internal at patch / construction / import time (never deep inside a
training step)."""

import subprocess
import sys
import warnings

import expected
import pytest

trl = expected.require_module("trl")

from prefopt_fast.integrations import trl as ptrl  # noqa: E402
from prefopt_fast.integrations import version_guard  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    monkeypatch.setattr(version_guard, "_warned", set())
    yield
    ptrl.unpatch_trl()


def test_tested_range_semantics():
    r = ("1.16", "1.17")
    assert version_guard.in_range("1.16.0", r) and version_guard.in_range("1.16.3", r)
    assert version_guard.in_range("1.16.1.post1", r)
    for v in ("1.15.2", "1.17.0", "1.17.0rc1", "1.17.0.dev0", "2.0.0"):
        assert not version_guard.in_range(v, r), v


def test_installed_trl_is_judged_by_the_range():
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ptrl.check_trl()
    untested = [x for x in w if issubclass(x.category, version_guard.UntestedVersionWarning)]
    assert len(untested) == (0 if version_guard.in_range(trl.__version__, ptrl.TESTED_TRL) else 1)


def test_untested_version_warns_once_naming_the_range(monkeypatch):
    monkeypatch.setattr(trl, "__version__", "1.18.0")
    with pytest.warns(version_guard.UntestedVersionWarning, match=r"tested with trl >= 1\.16, < 1\.17; trl 1\.18\.0"):
        ptrl.patch_trl()
    assert ptrl.is_trl_patched()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with ptrl.patched_trl():  # the same version again: no second warning
            pass


def test_missing_internal_is_an_error_at_patch_time(monkeypatch):
    monkeypatch.delattr(trl.GRPOTrainer, "_get_per_token_logps_and_entropies")
    with pytest.raises(
        RuntimeError,
        match=r"needs trl\.GRPOTrainer\._get_per_token_logps_and_entropies, which trl "
        r".* does not have",
    ):
        ptrl.patch_trl()
    assert not ptrl.is_trl_patched()
    with pytest.raises(RuntimeError, match=r"_get_per_token_logps_and_entropies"):
        with ptrl.patched_trl():
            pass


def test_missing_internal_is_an_import_error_naming_it():
    code = (
        "import trl.trainer.utils\n"
        "del trl.trainer.utils._ChunkedLogProbFunction\n"
        "try:\n"
        "    import prefopt_fast.integrations.trl\n"
        "except ImportError as e:\n"
        "    print('ImportError:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300).stdout
    assert "ImportError: prefopt_fast.integrations.trl needs trl.trainer.utils._ChunkedLogProbFunction" in out, out


def test_missing_trainer_attribute_names_it():
    class Bare:
        _metrics = {}

    with pytest.raises(RuntimeError, match=r"trl\.DPOTrainer of trl .* sets no _total_train_tokens, _tp_size"):
        ptrl._check_trainer(Bare(), "DPOTrainer")


def test_every_listed_internal_resolves_in_the_tested_range():
    if not version_guard.in_range(trl.__version__, ptrl.TESTED_TRL):
        pytest.skip(
            f"trl {trl.__version__} is outside the tested range {ptrl.TESTED_TRL}: "
            "test_installed_trl_is_judged_by_the_range covers it"
        )
    assert version_guard.missing_internals(ptrl.TRL_INTERNALS) == []
    assert version_guard.resolve("trl.trainer.utils.no_such_name") is None
    assert version_guard.resolve("no_such_package.x") is None
