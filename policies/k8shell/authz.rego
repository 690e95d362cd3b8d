# k8shell's default authorization policy.
#
# Input (authz always sends every field, empty when unknown):
#   {subject: {sub, roles, scopes, kind, amr}, action: "<domain>:<verb>",
#    resource: {type, id, attributes}, context}
# Output: data.k8shell.authz.decision = {allow, reasons, obligations}
#
# Rules of thumb: admins reach everything; users reach their own things;
# a token's scopes (personal access tokens) narrow what it may do and never
# widen it. Any denial vetoes; otherwise any grant allows.
#
# Shape, for speed: a decision is one rule. The action's domain (`ssh` of
# `ssh:shell`) selects that domain's functions in domains.rego — `grants`
# (why something is allowed), `denials` (vetoes) and `obligations` — so a
# decision evaluates only its own domain's conditions. (The interpreter
# evaluates every definition of a rule, each about as costly as a small
# decision, while a function call on a constant argument costs little.)
package k8shell.authz

import rego.v1

# An input without an action (authz never sends one) is refused.
default decision := {"allow": false, "reasons": ["the input has no action"], "obligations": {}}

decision := verdict(granted, denied, obligations_of(domain)) if {
	domain := substring(input.action, 0, indexof(input.action, ":"))
	granted := {"admin" | admin(input.subject)} | {g | some g in grants(domain)}
	denied := (
		{"no authenticated subject" | not authenticated(input.subject)} |
		{sprintf("the token's scopes do not include %s", [input.action]) | not within_scopes(input.subject, input.action)} |
		{d | some d in denials(domain)}
	)
}

verdict(granted, denied, obligations) := {"allow": true, "reasons": sort(granted), "obligations": obligations} if {
	count(granted) > 0
	count(denied) == 0
}

verdict(_, denied, _) := {"allow": false, "reasons": sort(denied), "obligations": {}} if count(denied) > 0

verdict(granted, denied, _) := {
	"allow": false,
	"reasons": [sprintf("no rule allows %s", [input.action])],
	"obligations": {},
} if {
	count(denied) == 0
	count(granted) == 0
}

authenticated(subject) if subject.sub != ""

admin(subject) if "admin" in subject.roles

# A token without scopes carries all of its user's rights; a scoped one
# only the actions its patterns match (`workspace:*`, `ssh:shell`).
within_scopes(subject, _) if count(object.get(subject, "scopes", [])) == 0

within_scopes(subject, action) if {
	some scope in subject.scopes
	glob.match(scope, [":"], action)
}

# The resource's owner is the subject.
owns(subject, resource) if {
	subject.sub != ""
	resource.attributes.owner == subject.sub
}

# A domain without obligations for the action owes nothing.
obligations_of(domain) := o if {
	o := obligations(domain)
} else := {}
