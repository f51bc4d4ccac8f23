"""What a queue's webhook receives: the decision's JSON, a Slack or a Teams message.

``webhook_format`` in ``routing.toml`` chooses, per queue:

* ``json``: the decision record, byte for byte as on ``leadflow.decisions``;
* ``slack``: a message for a Slack incoming webhook, in Block Kit
  (https://api.slack.com/reference/block-kit/blocks), with a plain-text fallback;
* ``teams``: a message for a Microsoft Teams incoming webhook (or a Workflows
  "post to a channel when a webhook request is received"), an Adaptive Card 1.4
  (https://adaptivecards.io/explorer/) in the ``attachments`` envelope Teams reads.

Both messages say who (company domain, size, industry, country, seniority: the
engine stores no names, see :func:`engine.profile.lead_summary`), the SDR, score
and grade (if the decision has one), fit, the top reasons, the channels the SDR may
use, the SLA deadline and a link to the lead in the CRM (the queue's ``lead_url``).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import orjson

from engine.settings import LEAD_URL_FIELDS, QueueSettings

# Block Kit limits: a header's text, a section's text and each of its fields.
SLACK_HEADER_MAX, SLACK_TEXT_MAX, SLACK_FIELD_MAX, SLACK_FIELDS_MAX = 150, 3000, 2000, 10
TOP_REASONS = 3


def render_alert(queue: QueueSettings, decision: dict[str, Any], value: bytes) -> bytes:
    """The body POSTed to ``queue``'s webhook for ``decision`` (``value``: its JSON)."""
    if queue.webhook_format == "json":
        return value
    link = lead_link(queue.lead_url, decision)
    message = (
        slack_message(decision, link)
        if queue.webhook_format == "slack"
        else teams_message(decision, link)
    )
    return orjson.dumps(message)


def lead_link(template: str, decision: dict[str, Any]) -> str:
    """``template`` with its placeholders filled from ``decision`` (URL-quoted), or ''."""
    if not template:
        return ""
    values = {name: quote(str(decision.get(name) or ""), safe="") for name in LEAD_URL_FIELDS}
    return template.format_map(values)


def _facts(decision: dict[str, Any]) -> list[tuple[str, str]]:
    """The alert's facts as (title, value), in the order both formats show them."""
    lead = decision.get("lead") or {}
    size = lead.get("company_size")
    facts = [
        ("Company", lead.get("company_domain") or "unknown (no company e-mail yet)"),
        ("Company size", f"{size} employees" if size else "unknown"),
        ("Industry", lead.get("industry") or "unknown"),
        ("Country", lead.get("country") or "unknown"),
        ("Seniority", lead.get("seniority") or "unknown"),
        ("Score", f"{decision.get('score', 0):g} (MQL at {decision.get('threshold', 0):g})"),
    ]
    if decision.get("grade"):
        facts.append(("Grade", str(decision["grade"])))
    facts += [
        ("Fit", f"{decision.get('fit', 0):g} (minimum {decision.get('fit_minimum', 0):g})"),
        ("Channels", ", ".join(decision.get("channels") or []) or "none: do not contact"),
        ("Accept by", str(decision.get("sla_deadline", ""))),
    ]
    return facts


def _reasons(decision: dict[str, Any]) -> list[str]:
    return [
        f"{r['rule']}: {r['points']:g} points"
        for r in (decision.get("reasons") or [])[:TOP_REASONS]
    ]


def _title(decision: dict[str, Any]) -> str:
    who = (decision.get("lead") or {}).get("company_domain") or decision.get("one_id", "")
    sdr = decision.get("sdr_name") or decision.get("sdr", "")
    return f"New lead for {sdr}: {who}"


def _slack_escape(text: str) -> str:
    """Slack's mrkdwn reads &, < and > as markup."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_message(decision: dict[str, Any], link: str) -> dict[str, Any]:
    """A Slack incoming-webhook message (Block Kit) for ``decision``."""
    title = _title(decision)
    fields = [
        {"type": "mrkdwn", "text": _slack_escape(f"*{name}*\n{value}")[:SLACK_FIELD_MAX]}
        for name, value in _facts(decision)
    ][:SLACK_FIELDS_MAX]
    sdr = f"{decision.get('sdr_name') or ''} ({decision.get('sdr', '')})".strip()
    queue_line = (
        f"Assigned to *{sdr}* in queue *{decision.get('queue', '')}*,"
        f" decision `{decision.get('decision_id')}`"
    )
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": title[:SLACK_HEADER_MAX]}},
        {"type": "section", "text": {"type": "mrkdwn", "text": _slack_escape(queue_line)}},
        {"type": "section", "fields": fields},
    ]
    reasons = _reasons(decision)
    if reasons:
        text = "*Top reasons*\n" + "\n".join(f"• {r}" for r in reasons)
        blocks.append(
            {"type": "section", "text": {"type": "mrkdwn", "text": _slack_escape(text)[:3000]}}
        )
    if link:
        blocks.append(
            {
                "type": "actions",
                "elements": [
                    {
                        "type": "button",
                        "text": {"type": "plain_text", "text": "Open in CRM"},
                        "url": link,
                        "action_id": "open_lead",
                    }
                ],
            }
        )
    return {"text": title, "blocks": blocks}


def teams_message(decision: dict[str, Any], link: str) -> dict[str, Any]:
    """A Microsoft Teams incoming-webhook message (an Adaptive Card) for ``decision``."""
    body: list[dict[str, Any]] = [
        {
            "type": "TextBlock",
            "text": _title(decision),
            "size": "Large",
            "weight": "Bolder",
            "wrap": True,
        },
        {
            "type": "TextBlock",
            "text": f"Queue {decision.get('queue', '')}, decision {decision.get('decision_id')}",
            "isSubtle": True,
            "wrap": True,
        },
        {"type": "FactSet", "facts": [{"title": n, "value": v} for n, v in _facts(decision)]},
    ]
    reasons = _reasons(decision)
    if reasons:
        body.append({"type": "TextBlock", "text": "Top reasons", "weight": "Bolder"})
        body.append(
            {"type": "TextBlock", "text": "\n".join(f"- {r}" for r in reasons), "wrap": True}
        )
    card: dict[str, Any] = {
        "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
        "type": "AdaptiveCard",
        "version": "1.4",
        "body": body,
    }
    if link:
        card["actions"] = [{"type": "Action.OpenUrl", "title": "Open in CRM", "url": link}]
    return {
        "type": "message",
        "attachments": [
            {
                "contentType": "application/vnd.microsoft.card.adaptive",
                "contentUrl": None,
                "content": card,
            }
        ],
    }
