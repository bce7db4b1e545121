"""The one-command demo: a broker, the hub, three stores, a warehouse feed and shoppers.

`python -m demo` (or scripts/demo) runs everything on loopback under a state directory
(`.demo/` by default), prints each store's kiosk URL and stops everything on Ctrl-C.
`python -m demo link store-2 down|up` pulls or restores a store's link to the broker
while the demo runs (so is typing `down store-2` at the demo's prompt).
"""
