-- Where a workspace is reached while running, and how far provisioning got.
ALTER TABLE workspaces
    ADD COLUMN endpoint text NOT NULL DEFAULT '',
    ADD COLUMN stage    text NOT NULL DEFAULT '',
    ADD COLUMN progress smallint NOT NULL DEFAULT 0;

CREATE INDEX workspaces_by_state ON workspaces (state);
