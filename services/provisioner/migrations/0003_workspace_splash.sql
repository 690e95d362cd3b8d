-- The blueprint's splash of a running workspace (shown at SSH login).
ALTER TABLE workspaces
    ADD COLUMN splash text NOT NULL DEFAULT '';
