"""Small utilities shared by the agent, its sync process and the hub: no domain, no storage of their own."""
