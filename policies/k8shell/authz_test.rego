# Unit tests of the default policy; `cargo test -p k8shell-authz` runs every
# `test_*` rule here (and CI with it).
package k8shell.authz_test

import rego.v1

import data.k8shell.authz

alice := {"sub": "alice", "roles": [], "kind": "user"}

root := {"sub": "root", "roles": ["admin"], "kind": "user"}

alices_workspace := {"type": "workspace", "id": "alice-1a7fd88", "attributes": {"owner": "alice"}}

bobs_workspace := {"type": "workspace", "id": "bob-2b8ae99", "attributes": {"owner": "bob"}}

decide(subject, action, resource, ctx) := d if {
	d := authz.decision with input as {
		"subject": subject, "action": action, "resource": resource, "context": ctx,
	}
}

test_users_reach_their_own_workspaces if {
	every action in ["ssh:shell", "ssh:exec", "ssh:sftp", "ssh:agent-forward", "workspace:read", "workspace:connect"] {
		decide(alice, action, alices_workspace, {}).allow
	}
}

test_users_do_not_reach_others_workspaces if {
	every action in ["ssh:shell", "ssh:exec", "workspace:read", "workspace:delete", "session:start"] {
		not decide(alice, action, bobs_workspace, {}).allow
	}
	d := decide(alice, "ssh:shell", bobs_workspace, {})
	d.reasons == ["no rule allows ssh:shell"]
}

test_admins_reach_everything if {
	every action in ["ssh:shell", "workspace:delete", "user:write", "token:delete"] {
		decide(root, action, bobs_workspace, {}).allow
	}
	decide(root, "ssh:shell", bobs_workspace, {}).reasons == ["admin"]
}

test_scopes_narrow_and_never_widen if {
	scoped := object.union(alice, {"scopes": ["workspace:*"]})
	decide(scoped, "workspace:read", alices_workspace, {}).allow
	not decide(scoped, "ssh:shell", alices_workspace, {}).allow
	decide(scoped, "ssh:shell", alices_workspace, {}).reasons == ["the token's scopes do not include ssh:shell"]

	# A scope covering someone else's workspace grants nothing by itself.
	not decide(scoped, "workspace:read", bobs_workspace, {}).allow

	# Even an admin's scoped token is narrowed.
	scoped_admin := object.union(root, {"scopes": ["session:list"]})
	not decide(scoped_admin, "workspace:delete", bobs_workspace, {}).allow
}

test_forwarding_reaches_loopback_only if {
	decide(alice, "ssh:direct-tcpip", alices_workspace, {"host": "127.0.0.1", "port": "8080"}).allow
	d := decide(alice, "ssh:direct-tcpip", alices_workspace, {"host": "10.0.0.5", "port": "22"})
	not d.allow
	d.reasons == ["forwarding to 10.0.0.5 is not allowed"]
}

test_session_start_carries_the_record_obligation if {
	d := decide(alice, "session:start", alices_workspace, {"session_type": "shell"})
	d.allow
	d.obligations.record == "none"
	recorded := object.union(alices_workspace, {"attributes": {"owner": "alice", "record": "shell"}})
	decide(alice, "session:start", recorded, {}).obligations.record == "shell"
}

test_listing_is_scoped_for_users_not_admins if {
	d := decide(alice, "session:list", {"type": "session"}, {})
	d.allow
	d.obligations.username == "alice"
	a := decide(root, "session:list", {"type": "session"}, {})
	not a.obligations.username
	decide(alice, "workspace:list", {"type": "workspace"}, {}).obligations.username == "alice"
}

test_provisioning_is_capped_for_users if {
	d := decide(alice, "workspace:provision", {"type": "workspace", "attributes": {"owner": "alice"}}, {})
	d.allow
	d.obligations["patch:/resources/limits/cpu"] == "4"
	not decide(alice, "workspace:provision", bobs_workspace, {}).allow
	count(decide(root, "workspace:provision", bobs_workspace, {}).obligations) == 0
}

test_accounts_and_tokens_are_self_service if {
	me := {"type": "user", "id": "alice"}
	decide(alice, "user:read", me, {}).allow
	decide(alice, "token:create", me, {}).allow
	decide(alice, "token:create", me, {}).obligations.expires_in == "90d"
	not decide(alice, "user:write", {"type": "user", "id": "bob"}, {}).allow
	not decide(alice, "user:create", {"type": "user", "id": "carol"}, {}).allow
	decide(root, "user:create", {"type": "user", "id": "carol"}, {}).allow
}

test_onboarding_gives_no_privileges if {
	d := decide(alice, "user:onboard", {"type": "user", "id": "alice"}, {"provider": "corp"})
	d.allow
	d.obligations.sudo == "false"
	not decide(alice, "user:onboard", {"type": "user", "id": "alice"}, {}).allow
}

test_anonymous_requests_are_refused if {
	d := decide({}, "workspace:list", {"type": "workspace"}, {})
	not d.allow
	d.reasons == ["no authenticated subject"]
}

test_actions_of_unknown_domains_are_refused_to_users if {
	d := decide(alice, "mail:send", alices_workspace, {})
	not d.allow
	d.reasons == ["no rule allows mail:send"]
	count(d.obligations) == 0
}

test_missing_fields_fail_closed if {
	not decide({"sub": "alice"}, "ssh:shell", {"type": "workspace", "id": "alice-1a7fd88"}, {}).allow
	not decide({"roles": ["admin"]}, "ssh:shell", bobs_workspace, {}).allow
}
