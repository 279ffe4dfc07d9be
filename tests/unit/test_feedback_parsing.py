"""Parsing of CDS Hooks 2.0 feedback request bodies."""

from __future__ import annotations

import copy
from datetime import datetime, timezone

import pytest

from service.cds_hooks.feedback import FeedbackError, FeedbackItem, parse_feedback

# The three examples from the CDS Hooks 2.0 "Feedback" section, verbatim.
SPEC_ACCEPTED = {
    "feedback": [
        {
            "card": "4e0a3a1e-3283-4575-ab82-028d55fe2719",
            "outcome": "accepted",
            "acceptedSuggestions": [{"id": "e56e1945-20b3-4393-8503-a1a20fd73152"}],
            "outcomeTimestamp": "2021-12-11T10:05:31Z",
        }
    ]
}
SPEC_OVERRIDDEN_WITHOUT_REASON = {
    "feedback": [
        {
            "card": "f6b95768-b1c8-40dc-8385-bf3504b82ffb",
            "outcome": "overridden",
            "outcomeTimestamp": "2020-12-11T00:00:00Z",
        }
    ]
}
SPEC_OVERRIDDEN_WITH_REASON = {
    "feedback": [
        {
            "card": "9368d37b-283f-44a0-93ea-547cebab93ed",
            "outcome": "overridden",
            "overrideReason": {
                "reason": {
                    "code": "d7ecf885",
                    "system": "https://example.com/cds-hooks/override-reason-system",
                },
                "userComment": "A comment entered by the clinician.",
            },
            "outcomeTimestamp": "2020-12-11T00:00:00Z",
        }
    ]
}


def body_with_bad_third_item(**changes: object) -> dict:
    """Two valid items followed by one modified item, so errors must name index 2."""
    body = {
        "feedback": [
            copy.deepcopy(SPEC_ACCEPTED["feedback"][0]),
            copy.deepcopy(SPEC_OVERRIDDEN_WITHOUT_REASON["feedback"][0]),
            copy.deepcopy(SPEC_ACCEPTED["feedback"][0]),
        ]
    }
    for key, value in changes.items():
        if value is None:
            body["feedback"][2].pop(key, None)
        else:
            body["feedback"][2][key] = value
    return body


def test_spec_example_of_an_accepted_suggestion_parses_to_an_accepted_item():
    [item] = parse_feedback(SPEC_ACCEPTED)
    assert item == FeedbackItem(
        card="4e0a3a1e-3283-4575-ab82-028d55fe2719",
        outcome="accepted",
        accepted_suggestions=("e56e1945-20b3-4393-8503-a1a20fd73152",),
        override_reason_code=None,
        override_reason_system=None,
        override_reason_display=None,
        user_comment=None,
        outcome_timestamp=datetime(2021, 12, 11, 10, 5, 31, tzinfo=timezone.utc),
    )


def test_spec_example_of_an_override_without_reason_parses_with_no_reason():
    [item] = parse_feedback(SPEC_OVERRIDDEN_WITHOUT_REASON)
    assert item.outcome == "overridden"
    assert item.card == "f6b95768-b1c8-40dc-8385-bf3504b82ffb"
    assert item.accepted_suggestions == ()
    assert item.override_reason_code is None and item.user_comment is None


def test_spec_example_of_an_override_with_reason_keeps_coding_and_comment():
    [item] = parse_feedback(SPEC_OVERRIDDEN_WITH_REASON)
    assert item.override_reason_code == "d7ecf885"
    assert item.override_reason_system == "https://example.com/cds-hooks/override-reason-system"
    assert item.override_reason_display is None
    assert item.user_comment == "A comment entered by the clinician."
    assert item.outcome_timestamp == datetime(2020, 12, 11, tzinfo=timezone.utc)


def test_timestamp_is_utc_aware_even_when_sent_with_an_offset_and_fraction():
    body = body_with_bad_third_item(outcomeTimestamp="1985-04-12T23:20:50.52+02:00")
    item = parse_feedback(body)[2]
    assert item.outcome_timestamp.utcoffset().total_seconds() == 0
    assert item.outcome_timestamp == datetime(1985, 4, 12, 21, 20, 50, 520000, tzinfo=timezone.utc)


def test_override_with_only_a_user_comment_is_accepted():
    body = body_with_bad_third_item(
        outcome="overridden", acceptedSuggestions=None, overrideReason={"userComment": "not relevant"}
    )
    item = parse_feedback(body)[2]
    assert item.user_comment == "not relevant" and item.override_reason_code is None


def test_unknown_extra_fields_are_ignored():
    body = copy.deepcopy(SPEC_ACCEPTED)
    body["extension"] = {"x": 1}
    body["feedback"][0]["vendorField"] = [1, 2]
    assert parse_feedback(body) == parse_feedback(SPEC_ACCEPTED)


def test_several_items_come_back_in_request_order():
    items = parse_feedback(body_with_bad_third_item())
    assert [i.outcome for i in items] == ["accepted", "overridden", "accepted"]


def assert_error(body: object, index: int | None, field: str | None, fragment: str) -> FeedbackError:
    """Parse and check that the error names the index and field."""
    with pytest.raises(FeedbackError) as caught:
        parse_feedback(body)
    error = caught.value
    assert (error.index, error.field) == (index, field)
    assert fragment in str(error)
    return error


def test_missing_card_is_reported_with_its_index_and_field():
    error = assert_error(body_with_bad_third_item(card=None), 2, "card", "missing")
    assert str(error).startswith("feedback[2].card: ")


def test_empty_card_is_reported_with_its_index_and_field():
    assert_error(body_with_bad_third_item(card=""), 2, "card", "feedback[2].card: ")


def test_outcome_other_than_accepted_or_overridden_is_reported():
    assert_error(body_with_bad_third_item(outcome="ignored"), 2, "outcome", "feedback[2].outcome: ")
    assert_error(body_with_bad_third_item(outcome="ignored"), 2, "outcome", "'ignored'")


def test_accepted_without_accepted_suggestions_is_reported():
    assert_error(
        body_with_bad_third_item(acceptedSuggestions=None), 2, "acceptedSuggestions",
        "feedback[2].acceptedSuggestions: required",
    )


def test_accepted_with_an_empty_suggestion_list_is_reported():
    assert_error(
        body_with_bad_third_item(acceptedSuggestions=[]), 2, "acceptedSuggestions",
        "feedback[2].acceptedSuggestions: ",
    )


def test_accepted_suggestion_without_an_id_is_reported_with_its_position():
    assert_error(
        body_with_bad_third_item(acceptedSuggestions=[{"id": "a"}, {"uuid": "b"}]),
        2, "acceptedSuggestions[1].id", "feedback[2].acceptedSuggestions[1].id: ",
    )


def test_non_rfc3339_timestamp_is_reported_with_the_value_received():
    error = assert_error(
        body_with_bad_third_item(outcomeTimestamp="12/11/2020"), 2, "outcomeTimestamp", "12/11/2020"
    )
    assert str(error) == (
        "feedback[2].outcomeTimestamp: expected an RFC 3339 date-time in UTC, got '12/11/2020'"
    )


@pytest.mark.parametrize(
    "timestamp",
    [
        "2020-12-11",  # date only
        "2020-12-11T00:00:00",  # no offset: the instant is ambiguous
        "2020-12-11 00:00:00Z",  # space separator is not RFC 3339 section 5.6
        "2021-02-30T00:00:00Z",  # well-formed but impossible
        1607644800,  # epoch seconds
    ],
)
def test_timestamp_variants_that_are_not_rfc3339_date_times_are_reported(timestamp):
    assert_error(body_with_bad_third_item(outcomeTimestamp=timestamp), 2, "outcomeTimestamp", "RFC 3339")


def test_missing_timestamp_is_reported():
    assert_error(body_with_bad_third_item(outcomeTimestamp=None), 2, "outcomeTimestamp", "missing")


def test_override_reason_coding_without_code_is_reported():
    assert_error(
        body_with_bad_third_item(outcome="overridden", overrideReason={"reason": {"system": "s"}}),
        2, "overrideReason.reason.code", "feedback[2].overrideReason.reason.code: ",
    )


def test_non_string_user_comment_is_reported():
    assert_error(
        body_with_bad_third_item(outcome="overridden", overrideReason={"userComment": 5}),
        2, "overrideReason.userComment", "a number",
    )


def test_item_that_is_not_an_object_is_reported_by_index():
    body = {"feedback": [SPEC_ACCEPTED["feedback"][0], "accepted"]}
    error = assert_error(body, 1, None, "expected an object")
    assert str(error).startswith("feedback[1]: ")


def test_feedback_that_is_not_a_list_is_reported():
    assert_error({"feedback": SPEC_ACCEPTED["feedback"][0]}, None, "feedback", "feedback: expected an array")


def test_missing_feedback_member_is_reported():
    assert_error({"feedbacks": []}, None, "feedback", "missing")


def test_empty_feedback_list_is_reported():
    assert_error({"feedback": []}, None, "feedback", "feedback: expected at least one")


@pytest.mark.parametrize("body", [[SPEC_ACCEPTED], "feedback", None, 3])
def test_body_that_is_not_an_object_is_reported(body):
    error = assert_error(body, None, None, "expected a JSON object")
    assert str(error).startswith("body: ")


def test_huge_bad_values_are_truncated_in_the_message():
    error = assert_error(body_with_bad_third_item(outcome="x" * 10_000), 2, "outcome", "...")
    assert len(str(error)) < 200


def test_feedback_error_is_a_value_error_so_generic_handlers_catch_it():
    assert issubclass(FeedbackError, ValueError)
