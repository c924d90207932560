"""``relayrace explain``: a request's story drawn for a terminal or as an HTML page.

``relayrace._story.read_stories`` reads the stories from whatever the gateway answered or
logged; ``render_text`` draws one for the terminal (the attempts on a timeline scaled to its
width, the decisions with their rules, a one-line verdict), ``render_html`` draws them all as
one self-contained page. Both are pure; only ``main`` reads and writes.
"""

from __future__ import annotations

import html
import shutil
import sys
from typing import TextIO

from ._story import Choice, ExplainError, Step, Story, read_stories

# --- rendering ---------------------------------------------------------------------------------

_LEFT = 20  # "  +0.000s   0.012s  "


def render_text(story: Story, *, width: int = 80) -> str:
    """The story for a terminal ``width`` columns wide: a header, the attempts on a timeline
    (bars scaled to the width), the decisions with their rules, and a one-line verdict."""
    lines = [_header(story)]
    span = _span(story)
    if story.steps:
        labels = [_step_label(step) for step in story.steps]
        bar = max(10, width - _LEFT - 2 - max(map(len, labels)))
        lines.append(f"timeline (from the first attempt; {span:.3f}s in all)")
        for step, label in zip(story.steps, labels, strict=True):
            start, length = _cells(step, span, bar)
            track = "·" * start + "█" * length + "·" * (bar - start - length)
            lines.append(f"  +{step.offset:.3f}s {step.duration:7.3f}s  {track}  {label}")
        if story.steps_total > len(story.steps):
            lines.append(f"  (+{story.steps_total - len(story.steps)} attempts not recorded)")
    else:
        lines.append("no attempts were made")
    if story.choices:
        lines.append("decisions")
        for number, choice in enumerate(story.choices, 1):
            lines.append(f"  {number}. {_choice_text(choice)}")
    lines.append(f"verdict: {verdict(story)}")
    return "\n".join(lines)


def verdict(story: Story) -> str:
    """One line: who served the request and after what, or why it failed."""
    failed = [s for s in story.steps if s.outcome != "ok"]
    failovers = sum(c.action == "failover" for c in story.choices)
    after = []
    if failed:
        on = ", ".join(dict.fromkeys(s.provider for s in failed))
        after.append(f"{_plural(len(failed), 'failed attempt')} on {on}")
    if failovers:
        after.append(_plural(failovers, "failover"))
    if story.ok:
        text = f"served by {story.provider}"
        if story.model:
            text += f" (model {story.model})"
        if after:
            text += " after " + " and ".join(after)
        if story.latency is not None:
            text += f" in {story.latency:.3f}s"
        return text
    text = f"failed: {story.category or 'unknown'}"
    if story.code and story.code != story.category:
        text += f"/{story.code}"
    if story.failed_on:
        text += f" from {story.failed_on}"
    if story.message:
        text += f" ({_short(story.message, 120)})"
    stop = next((c for c in reversed(story.choices) if c.action == "stop"), None)
    if stop is not None:
        text += f"; stopped by {stop.rule}"
    if after:
        text += "; " + "; ".join(after)
    return text


def render_html(stories: list[Story]) -> str:
    """One self-contained page (inline CSS, no scripts) with every story's timeline."""
    sections = "\n".join(_html_story(story) for story in stories)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8"/>
<title>relayrace explain</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }}
section {{ border: 1px solid #ddd; border-radius: 6px; padding: 1em; margin-bottom: 1.5em; }}
h2 {{ font-size: 1.1em; margin: 0 0 .5em; }}
table {{ border-collapse: collapse; width: 100%; }}
th, td {{ text-align: left; padding: 2px 8px; white-space: nowrap; }}
td.track {{ width: 50%; }}
.lane {{ position: relative; height: 14px; background: #f2f2f2; }}
.bar {{ position: absolute; top: 0; height: 14px; min-width: 2px; }}
.ok .bar {{ background: #2a9d4b; }}
.failed .bar {{ background: #d0473a; }}
.cancelled .bar {{ background: #999; }}
code {{ background: #f5f5f5; padding: 0 3px; }}
.verdict {{ font-weight: bold; }}
</style>
</head>
<body>
<h1>relayrace explain</h1>
{sections}
</body>
</html>
"""


def _html_story(story: Story) -> str:
    e = html.escape
    span = _span(story)
    rows = []
    for step in story.steps:
        left = 100 * step.offset / span if span else 0.0
        size = 100 * step.duration / span if span else 100.0
        rows.append(
            f'<tr class="{e(step.outcome)}"><td>+{step.offset:.3f}s</td>'
            f"<td>{step.duration:.3f}s</td>"
            f'<td class="track"><div class="lane"><div class="bar" style="left:{left:.2f}%;'
            f'width:{size:.2f}%"></div></div></td><td>{e(_step_label(step))}</td></tr>'
        )
    if story.steps_total > len(story.steps):
        rows.append(
            f'<tr><td colspan="4">+{story.steps_total - len(story.steps)} attempts not'
            " recorded</td></tr>"
        )
    choices = "".join(
        f"<li><b>{e(c.action)}</b> {e(c.actor or '')} {e(c.category or '')}"
        f"{f' wait {c.wait:.3f}s' if c.wait else ''} <code>{e(c.rule)}</code>"
        f" {e(_short(c.reason, 200))}</li>"
        for c in story.choices
    )
    return (
        f"<section><h2>{e(_header(story))}</h2>\n"
        + (
            "<table><tr><th>offset</th><th>duration</th><th>timeline</th><th>attempt</th></tr>"
            + "".join(rows)
            + "</table>\n"
            if rows
            else "<p>no attempts were made</p>\n"
        )
        + (f"<h3>decisions</h3><ol>{choices}</ol>\n" if choices else "")
        + f'<p class="verdict">verdict: {e(verdict(story))}</p></section>'
    )


def _header(story: Story) -> str:
    parts = ["request" if story.request_id is None else f"request #{story.request_id}"]
    parts += [p for p in (story.time, story.surface, story.route) if p]
    parts.append(f"(from {story.source})")
    return " ".join(parts)


def _step_label(step: Step) -> str:
    label = step.provider + ("" if step.number is None else f"#{step.number}")
    label += f"  {step.outcome}"
    if step.category:
        label += f"  {step.category}"
        if step.code and step.code != step.category:
            label += f"/{step.code}"
        if step.status is not None:
            label += f" ({step.status})"
    if step.first_token is not None:
        label += f"  first token +{step.first_token:.3f}s"
    if step.probe:
        label += "  [probe]"
    if step.continuation:
        label += "  [continuation]"
    return label


def _choice_text(choice: Choice) -> str:
    text = f"{choice.action:<8} {choice.actor or '-'}"
    if choice.category:
        text += f"  {choice.category}"
    if choice.wait:
        text += f"  wait {choice.wait:.3f}s"
    text += f"  {choice.rule}"
    if choice.reason:
        text += f" — {_short(choice.reason, 100)}"
    return text


def _span(story: Story) -> float:
    return max((s.offset + s.duration for s in story.steps), default=0.0)


def _cells(step: Step, span: float, bar: int) -> tuple[int, int]:
    """Where a step's bar starts and how long it is, in cells of a ``bar``-cell track."""
    if span <= 0:
        return 0, bar
    # Both ends rounded the same way: adjacent attempts meet, and the last one ends the track.
    start = min(bar - 1, round(step.offset / span * bar))
    end = round((step.offset + step.duration) / span * bar)
    return start, min(max(1, end - start), bar - start)


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _short(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- the command -------------------------------------------------------------------------------


def main(
    path: str, *, html_out: str | None = None, width: int | None = None, stdin: TextIO | None = None
) -> int:
    """``relayrace explain``: print each story in ``path`` (``-``: standard input), and write
    the page to ``html_out`` if given. Returns the exit status: 0, or 2 (one line on stderr)
    for input it cannot read or a page it cannot write."""
    source = "<stdin>" if path == "-" else path
    try:
        if path == "-":
            text = (stdin or sys.stdin).read()
        else:
            with open(path, encoding="utf-8") as file:
                text = file.read()
    except (OSError, UnicodeDecodeError) as exc:
        print(f"relayrace explain: cannot read {source}: {_reason(exc)}", file=sys.stderr)
        return 2
    try:
        stories = read_stories(text)
    except ExplainError as exc:
        print(f"relayrace explain: {source}: {exc}", file=sys.stderr)
        return 2
    columns = width or shutil.get_terminal_size().columns
    print("\n\n".join(render_text(story, width=columns) for story in stories))
    if html_out is not None:
        try:
            with open(html_out, "w", encoding="utf-8") as file:
                file.write(render_html(stories))
        except OSError as exc:
            print(f"relayrace explain: cannot write {html_out}: {_reason(exc)}", file=sys.stderr)
            return 2
        count = "1 story" if len(stories) == 1 else f"{len(stories)} stories"
        print(f"relayrace explain: wrote {html_out} ({count})", file=sys.stderr)
    return 0


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, UnicodeDecodeError):
        return "not UTF-8 text"
    return str(exc)
