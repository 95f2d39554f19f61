"""The plan catalog (DESIGN §9): the example loads; a bad catalog fails naming the file and the key."""

from __future__ import annotations

import re
from decimal import Decimal
from pathlib import Path

import pytest

from service.domain.catalog import DEFAULT_GRACE_PERIOD_DAYS, EXAMPLE_CATALOG, CatalogError, load_catalog
from service.domain.values import FeatureKind

VALID_CREDITS = """
[credits.ai_tokens]
overage_limit = "0"

[credits.api_calls]
dodo_credit_entitlement_id = "cent_api"
overage_limit = "100"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "catalog.toml"
    path.write_text(text, encoding="utf-8")
    return path


def load_error(path: Path) -> str:
    with pytest.raises(CatalogError) as info:
        load_catalog(path)
    return str(info.value)


def assert_names(message: str, path: Path, *fragments: str) -> None:
    assert message.startswith(f"{path}: "), message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


# --- The example catalog


def test_example_catalog_loads_with_plans_credits_and_kinds() -> None:
    catalog = load_catalog(EXAMPLE_CATALOG)
    assert catalog.source == str(EXAMPLE_CATALOG)
    assert catalog.grace_period_days == 7
    pro = catalog.plan("pdt_6Gx2Kq9LwPro0Mth4Rt1")
    assert pro is not None
    assert pro.name == "Pro"
    assert pro.features == frozenset({"dashboard", "pro"})
    assert dict(pro.limits) == {"projects": 50, "seats": 5}
    assert dict(pro.credits) == {"ai_tokens": Decimal("10000")}
    assert dict(pro.trial_credits) == {"ai_tokens": Decimal("1000")}
    assert catalog.grace_days("pdt_6Gx2Kq9LwPro0Mth4Rt1") == 3
    assert catalog.grace_days("pdt_3Rt8Yu1PaTeam0Mth7Wq") == 7
    assert catalog.kind_of("sso") is FeatureKind.BOOLEAN
    assert catalog.kind_of("seats") is FeatureKind.LIMIT
    assert catalog.kind_of("ai_tokens") is FeatureKind.CREDIT
    assert catalog.kind_of("api_calls") is FeatureKind.CREDIT
    assert catalog.kind_of("nonexistent") is None
    linked = catalog.credit_for_entitlement("cent_7Dk2Mq8Wx5Lp3Zr9Tv1Nb")
    assert linked is not None
    assert linked.key == "api_calls"
    assert linked.overage_limit == Decimal(100)
    assert catalog.credit_for_entitlement("cent_unknown") is None


def test_grace_period_defaults_to_seven_days_when_unset(tmp_path: Path) -> None:
    catalog = load_catalog(write(tmp_path, '[plans.pdt_a]\nfeatures = ["x"]\n'))
    assert catalog.grace_period_days == DEFAULT_GRACE_PERIOD_DAYS == 7
    assert catalog.grace_days("pdt_a") == 7
    assert catalog.grace_days("pdt_not_in_catalog") == 7


def test_plan_grace_zero_overrides_default(tmp_path: Path) -> None:
    catalog = load_catalog(write(tmp_path, "grace_period_days = 5\n[plans.pdt_a]\ngrace_period_days = 0\n"))
    assert catalog.grace_days("pdt_a") == 0
    assert catalog.grace_days("pdt_b") == 5


# --- A key used as two kinds


def test_feature_also_used_as_limit_names_file_key_and_both_places(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[plans.pdt_a]
features = ["projects"]

[plans.pdt_b]
limits = { projects = 5 }
""",
    )
    assert_names(load_error(path), path, "plans.pdt_b.limits.projects", "'projects'", "limit", "boolean")
    assert "plans.pdt_a.features" in load_error(path)


def test_feature_and_limit_in_the_same_plan_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, '[plans.pdt_a]\nfeatures = ["seats"]\nlimits = { seats = 3 }\n')
    assert_names(load_error(path), path, "plans.pdt_a.limits.seats", "'seats'")


def test_feature_also_declared_as_credit_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, VALID_CREDITS + '\n[plans.pdt_a]\nfeatures = ["ai_tokens"]\n')
    assert_names(load_error(path), path, "plans.pdt_a.features", "'ai_tokens'", "credits.ai_tokens", "credit")


def test_limit_also_declared_as_credit_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, VALID_CREDITS + "\n[plans.pdt_a]\nlimits = { api_calls = 10 }\n")
    assert_names(load_error(path), path, "plans.pdt_a.limits.api_calls", "'api_calls'", "credits.api_calls")


# --- Credits referenced by plans


def test_unknown_credit_in_plan_credits_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, VALID_CREDITS + '\n[plans.pdt_a]\ncredits = { gpu_minutes = "10" }\n')
    assert_names(load_error(path), path, "plans.pdt_a.credits.gpu_minutes", "unknown credit", "[credits.gpu_minutes]")


def test_unknown_credit_in_plan_trial_credits_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, VALID_CREDITS + '\n[plans.pdt_a]\ntrial_credits = { gpu_minutes = "10" }\n')
    assert_names(load_error(path), path, "plans.pdt_a.trial_credits.gpu_minutes", "unknown credit")


def test_duplicate_dodo_credit_entitlement_id_names_both_credits(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[credits.api_calls]
dodo_credit_entitlement_id = "cent_same"

[credits.api_calls_copy]
dodo_credit_entitlement_id = "cent_same"
""",
    )
    assert_names(
        load_error(path),
        path,
        "credits.api_calls_copy.dodo_credit_entitlement_id",
        "'cent_same'",
        "credits.api_calls",
    )


def test_empty_dodo_credit_entitlement_id_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, '[credits.api_calls]\ndodo_credit_entitlement_id = ""\n')
    assert_names(load_error(path), path, "credits.api_calls.dodo_credit_entitlement_id")


# --- Bad values


@pytest.mark.parametrize(
    "value",
    ['"lots"', '"-5"', '"NaN"', '"Infinity"', "1.5", "true", "-3", '""'],
    ids=["word", "negative-string", "nan", "infinity", "float", "bool", "negative-int", "empty"],
)
def test_bad_decimal_in_plan_credits_names_the_key(tmp_path: Path, value: str) -> None:
    path = write(tmp_path, VALID_CREDITS + f"\n[plans.pdt_a]\ncredits = {{ ai_tokens = {value} }}\n")
    assert_names(load_error(path), path, "plans.pdt_a.credits.ai_tokens", "decimal")


def test_bad_decimal_in_overage_limit_names_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, '[credits.ai_tokens]\noverage_limit = "ten"\n')
    assert_names(load_error(path), path, "credits.ai_tokens.overage_limit", "'ten'")


def test_decimal_amounts_accept_strings_and_integers(tmp_path: Path) -> None:
    path = write(tmp_path, VALID_CREDITS + '\n[plans.pdt_a]\ncredits = { ai_tokens = "0.25", api_calls = 7 }\n')
    plan = load_catalog(path).plan("pdt_a")
    assert plan is not None
    assert dict(plan.credits) == {"ai_tokens": Decimal("0.25"), "api_calls": Decimal(7)}


def test_negative_default_grace_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "grace_period_days = -1\n")
    assert_names(load_error(path), path, "grace_period_days", "0 or more")


def test_negative_plan_grace_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "[plans.pdt_a]\ngrace_period_days = -2\n")
    assert_names(load_error(path), path, "plans.pdt_a.grace_period_days", "0 or more")


@pytest.mark.parametrize("value", ['"7"', "1.5", "true"], ids=["string", "float", "bool"])
def test_non_integer_grace_is_an_error(tmp_path: Path, value: str) -> None:
    path = write(tmp_path, f"[plans.pdt_a]\ngrace_period_days = {value}\n")
    assert_names(load_error(path), path, "plans.pdt_a.grace_period_days")


def test_non_integer_limit_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, '[plans.pdt_a]\nlimits = { seats = "5" }\n')
    assert_names(load_error(path), path, "plans.pdt_a.limits.seats", "integer")


def test_features_not_a_list_of_strings_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, '[plans.pdt_a]\nfeatures = "dashboard"\n')
    assert_names(load_error(path), path, "plans.pdt_a.features")


# --- Unknown keys


def test_unknown_top_level_key_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "grace_days = 3\n")
    assert_names(load_error(path), path, "grace_days", "unknown top-level key")


def test_unknown_plan_key_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, '[plans.pdt_a]\nfeature = ["dashboard"]\n')
    assert_names(load_error(path), path, "plans.pdt_a.feature", "unknown key")


def test_unknown_credit_key_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "[credits.ai_tokens]\nroll_over = true\n")
    assert_names(load_error(path), path, "credits.ai_tokens.roll_over", "unknown key")


# --- Unreadable files


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[plans.pdt_a\nname = 'Pro'\n")
    assert_names(load_error(path), path, "not valid TOML")


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    message = load_error(path)
    assert re.fullmatch(rf"{re.escape(str(path))}: catalog file not found", message)
