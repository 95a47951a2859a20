"""The online loop that runs inside the server: promotion and rollback (``control``), the
canary and its monitor (``canary``), versions resolved from the registry (``versions``), the
command-line admin actions (``commands``) and training jobs (``jobs``).

It imports ``assistant/`` (engine, validation), ``store/`` and ``tuning/`` (settings); nothing in
``assistant/`` imports it."""
