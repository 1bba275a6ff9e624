"""Prints halo-sim's customers (and counts of the other records) as a table.

Reads the JSON of GET /_sim/state on stdin. Used by `make run`.
"""
import json
import sys

state = json.load(sys.stdin)
links = {
    link.get("halo_id"): link
    for link in state.get("external_links", [])
    if link.get("third_party_type") == "halosync.account"
}
header = ("id", "name", "active", "billing account", "version", "website")
rows = []
for c in state.get("clients", []):
    link = links.get(c["id"], {})
    version = (link.get("third_party_secondary_id") or "").split(";")[0]
    rows.append((
        str(c["id"]),
        c.get("name") or "",
        "no" if c.get("inactive") else "yes",
        link.get("third_party_id", "-"),
        version,
        c.get("website") or "",
    ))
widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
for r in [header, *rows]:
    print("  ".join(col.ljust(w) for col, w in zip(r, widths)).rstrip())
if not rows:
    print("(no customers yet: see .run/halosync-account.log)")
for key, label in (("licences", "software licences"),
                   ("recurring_invoices", "recurring invoices"),
                   ("invoices", "invoices")):
    if state.get(key):
        print(f"{len(state[key])} {label}")
