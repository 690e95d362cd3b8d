# k8shell's default authorization policy.
#
# Input:  {subject: {sub, roles, scopes, kind, amr}, action,
#          resource: {type, id, attributes}, context}
# Output: data.k8shell.authz.decision = {allow, reasons, obligations}
#
# Rules of thumb: admins reach everything; users reach their own things;
# a token's scopes (personal access tokens) narrow what it may do and never
# widen it. Each domain's file adds `grants` (why something is allowed) and
# `obligations`; `denials` veto.
package k8shell.authz

import rego.v1

subject := object.get(input, "subject", {})

roles := object.get(subject, "roles", [])

attributes := object.get(object.get(input, "resource", {}), "attributes", {})

context := object.get(input, "context", {})

action := object.get(input, "action", "")

is_admin if "admin" in roles

# The resource's owner is the subject.
is_owner if {
	attributes.owner != ""
	attributes.owner == subject.sub
}

# A token without scopes carries all of its user's rights; a scoped one
# only the actions its patterns match (`workspace:*`, `ssh:shell`).
within_scopes if count(object.get(subject, "scopes", [])) == 0

within_scopes if {
	some scope in subject.scopes
	glob.match(scope, [":"], action)
}

grants contains "admin" if is_admin

denials contains sprintf("the token's scopes do not include %s", [action]) if not within_scopes

denials contains "no authenticated subject" if object.get(subject, "sub", "") == ""

default allow := false

allow if {
	count(grants) > 0
	count(denials) == 0
}

reasons := sort(grants) if allow

reasons := sort(denials) if {
	not allow
	count(denials) > 0
}

reasons := [sprintf("no rule allows %s", [action])] if {
	not allow
	count(denials) == 0
}

decision := {
	"allow": allow,
	"reasons": reasons,
	"obligations": obligations,
} if allow

decision := {"allow": false, "reasons": reasons, "obligations": {}} if not allow
