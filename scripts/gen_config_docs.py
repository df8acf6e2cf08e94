"""Write the settings table of docs/configuration.md from the declarations in shared/settings.py.

    python scripts/gen_config_docs.py           # rewrite the table in place
    python scripts/gen_config_docs.py --check   # exit 1 when the page differs from the declarations

Only the text between the two markers is generated; the page's prose around it is kept as
written. tests/test_settings.py fails when the committed page differs from what this writes.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from shared import settings  # noqa: E402
from shared.settings import Setting  # noqa: E402

PAGE = REPO / "docs" / "configuration.md"
BEGIN = "<!-- settings table: generated from shared/settings.py by scripts/gen_config_docs.py; do not edit -->"
END = "<!-- end of the generated settings table -->"
HEADER = "| variable | used by | default | range | meaning |\n|---|---|---|---|---|"


def used_by(setting: Setting) -> str:
    """The functions as the docs name them: ``all``, ``dispatchers``, ``clean-up``..."""
    users = list(setting.used_by)
    if set(users) >= set(settings.FUNCTIONS):
        names = ["all"] + [u for u in users if u not in settings.FUNCTIONS]
    else:
        names = []
        for user in users:
            if user in settings.DISPATCHERS:
                if set(settings.DISPATCHERS) <= set(users):
                    if "dispatchers" not in names:
                        names.append("dispatchers")
                    continue
            names.append(user)
    shown = {settings.CLEANUP: "clean-up", settings.IMPORT_ECHO: "`pushctl import-echo`"}
    text = ", ".join(shown.get(name, name) for name in names)
    return f"{text} ({setting.where})" if setting.where else text


def default(setting: Setting) -> str:
    if setting.shown_default is not None:
        return setting.shown_default
    value = setting.default
    if value is None or value == ():
        return "-"
    if isinstance(value, tuple):
        return ", ".join(f"`{item}`" for item in value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
        return str(value)
    return f"`{value}`"


def bounds(setting: Setting) -> str:
    low, high = setting.minimum, setting.maximum
    if low is None and high is None:
        return ""
    if high is None:
        return f">= {low:g}"
    return f"{low or 0:g} to {high:g}"


def row(setting: Setting) -> str:
    name = f"`{setting.name}`" + (" (secret)" if setting.kind == settings.SECRET else "")
    return f"| {name} | {used_by(setting)} | {default(setting)} | {bounds(setting)} | {setting.meaning} |"


def table() -> str:
    return "\n".join([HEADER, *(row(setting) for setting in settings.SETTINGS)])


def page(text: str) -> str:
    """``text`` (the page) with its generated part replaced by the current table."""
    before, found, rest = text.partition(BEGIN)
    _, found_end, after = rest.partition(END)
    if not found or not found_end:
        raise SystemExit(f"{PAGE}: the markers of the generated table are missing")
    return f"{before}{BEGIN}\n{table()}\n{END}{after}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only say whether the page is current")
    args = parser.parse_args()
    current = PAGE.read_text()
    wanted = page(current)
    if args.check:
        if current != wanted:
            print(f"{PAGE.relative_to(REPO)} differs from shared/settings.py: run {sys.argv[0]}", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
