"""``flask --app morag_remote remote-jobs deliver``: send pending completion events now."""
from __future__ import annotations

import json

import click
from flask.cli import with_appcontext

from ..context import events


@click.command("deliver")
@click.option("--limit", type=click.IntRange(1, 1_000_000), default=1000, show_default=True,
              help="Most events to attempt in this run.")
@click.option("--due-only", is_flag=True, help="Leave events whose retry backoff has not ended yet.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@with_appcontext
def deliver_command(limit: int, due_only: bool, as_json: bool) -> None:
    """Record events missing for finished jobs, then attempt every pending event once."""
    delivery = events()
    report = delivery.deliver_pending(limit=limit, due_only=due_only).as_dict()  # errors: OneLineGroup
    if as_json:
        click.echo(json.dumps(report, sort_keys=True))
    elif not delivery.settings.enabled:
        click.echo("no callback is configured (MORAG_REMOTE_CALLBACK_URL or "
                   "MORAG_REMOTE_CALLBACK_ALLOWED_PREFIXES): nothing to deliver")
    else:
        click.echo(f"{report['delivered']} delivered, {report['failed']} failed, "
                   f"{report['reconciled']} reconciled, {report['pending']} pending")
