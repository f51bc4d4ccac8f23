"""The published structure of a Slack and a Teams incoming-webhook message, as JSON Schema.

Written from the platforms' references, for the elements Leadflow sends (anything
else is refused, so a typo or an unsupported element fails the test):

* Slack: https://api.slack.com/reference/block-kit/blocks and
  https://api.slack.com/reference/block-kit/composition-objects (header text: plain
  text, at most 150 characters; a section's text at most 3,000 and at most 10 fields
  of at most 2,000; an actions block at most 25 elements; a button's text plain, at
  most 75, its url at most 3,000; at most 50 blocks in a message).
* Teams: the incoming-webhook envelope (``type: message``, one attachment of
  ``contentType: application/vnd.microsoft.card.adaptive``) and Adaptive Cards 1.4,
  http://adaptivecards.io/schemas/1.4.0/adaptive-card.json (TextBlock needs ``text``;
  FactSet needs ``facts`` of ``title`` and ``value`` strings; Action.OpenUrl needs a
  ``url``; the enums of size, weight and friends).
"""

from __future__ import annotations

from typing import Any


def _text(kind: str, max_length: int) -> dict[str, Any]:
    """A Block Kit text object: ``plain_text`` (may say ``emoji``) or ``mrkdwn``."""
    flag = "emoji" if kind == "plain_text" else "verbatim"
    return {
        "type": "object",
        "required": ["type", "text"],
        "additionalProperties": False,
        "properties": {
            "type": {"const": kind},
            "text": {"type": "string", "minLength": 1, "maxLength": max_length},
            flag: {"type": "boolean"},
        },
    }


def _plain(max_length: int) -> dict[str, Any]:
    return _text("plain_text", max_length)


def _mrkdwn(max_length: int) -> dict[str, Any]:
    return _text("mrkdwn", max_length)


_BUTTON = {
    "type": "object",
    "required": ["type", "text"],
    "additionalProperties": False,
    "properties": {
        "type": {"const": "button"},
        "text": _plain(75),
        "url": {"type": "string", "maxLength": 3000, "pattern": "^https?://"},
        "action_id": {"type": "string", "maxLength": 255},
        "value": {"type": "string", "maxLength": 2000},
        "style": {"enum": ["primary", "danger"]},
    },
}

SLACK_MESSAGE: dict[str, Any] = {
    "type": "object",
    "required": ["blocks"],
    "properties": {
        "text": {"type": "string"},  # the notification's fallback
        "blocks": {
            "type": "array",
            "minItems": 1,
            "maxItems": 50,
            "items": {
                "oneOf": [
                    {
                        "type": "object",
                        "required": ["type", "text"],
                        "additionalProperties": False,
                        "properties": {
                            "type": {"const": "header"},
                            "text": _plain(150),
                            "block_id": {"type": "string"},
                        },
                    },
                    {
                        "type": "object",
                        "required": ["type"],
                        "additionalProperties": False,
                        "anyOf": [{"required": ["text"]}, {"required": ["fields"]}],
                        "properties": {
                            "type": {"const": "section"},
                            "text": {"oneOf": [_mrkdwn(3000), _plain(3000)]},
                            "fields": {
                                "type": "array",
                                "maxItems": 10,
                                "items": {"oneOf": [_mrkdwn(2000), _plain(2000)]},
                            },
                            "block_id": {"type": "string"},
                        },
                    },
                    {
                        "type": "object",
                        "required": ["type", "elements"],
                        "additionalProperties": False,
                        "properties": {
                            "type": {"const": "actions"},
                            "elements": {"type": "array", "maxItems": 25, "items": _BUTTON},
                            "block_id": {"type": "string"},
                        },
                    },
                ]
            },
        },
    },
}

_SIZES = ["default", "small", "medium", "large", "extraLarge"]
_WEIGHTS = ["default", "lighter", "bolder"]


def _any_case(values: list[str]) -> dict[str, Any]:
    """Adaptive Card enums are case-insensitive."""
    return {"type": "string", "pattern": "^(?i:" + "|".join(values) + ")$"}


_TEXT_BLOCK = {
    "type": "object",
    "required": ["type", "text"],
    "additionalProperties": False,
    "properties": {
        "type": {"const": "TextBlock"},
        "text": {"type": "string"},
        "size": _any_case(_SIZES),
        "weight": _any_case(_WEIGHTS),
        "isSubtle": {"type": "boolean"},
        "wrap": {"type": "boolean"},
        "color": _any_case(["default", "dark", "light", "accent", "good", "warning", "attention"]),
        "spacing": _any_case(["default", "none", "small", "medium", "large", "extraLarge"]),
    },
}
_FACT_SET = {
    "type": "object",
    "required": ["type", "facts"],
    "additionalProperties": False,
    "properties": {
        "type": {"const": "FactSet"},
        "facts": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["title", "value"],
                "additionalProperties": False,
                "properties": {"title": {"type": "string"}, "value": {"type": "string"}},
            },
        },
    },
}
_OPEN_URL = {
    "type": "object",
    "required": ["type", "url"],
    "additionalProperties": False,
    "properties": {
        "type": {"const": "Action.OpenUrl"},
        "url": {"type": "string", "pattern": "^https?://"},
        "title": {"type": "string"},
    },
}

TEAMS_MESSAGE: dict[str, Any] = {
    "type": "object",
    "required": ["type", "attachments"],
    "properties": {
        "type": {"const": "message"},
        "attachments": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["contentType", "content"],
                "properties": {
                    "contentType": {"const": "application/vnd.microsoft.card.adaptive"},
                    "contentUrl": {"type": ["string", "null"]},
                    "content": {
                        "type": "object",
                        "required": ["type", "version", "body"],
                        "additionalProperties": False,
                        "properties": {
                            "$schema": {"type": "string"},
                            "type": {"const": "AdaptiveCard"},
                            "version": {"enum": ["1.0", "1.1", "1.2", "1.3", "1.4"]},
                            "body": {
                                "type": "array",
                                "items": {"oneOf": [_TEXT_BLOCK, _FACT_SET]},
                            },
                            "actions": {"type": "array", "items": _OPEN_URL},
                        },
                    },
                },
            },
        },
    },
}
