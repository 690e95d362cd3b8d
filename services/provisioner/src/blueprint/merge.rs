//! Blueprint inheritance, on the YAML tree before it is typed: maps merge
//! key by key, lists append (an item whose `name` matches a parent item
//! merges into it instead), scalars replace, and a value tagged `!replace`
//! replaces the parent's value whatever its kind.

use serde_yaml_ng::Value;
use serde_yaml_ng::value::TaggedValue;

/// The YAML tag that asks for replacement instead of merging.
pub const REPLACE_TAG: &str = "replace";

/// Keys that belong to the blueprint itself and are never inherited.
const OWN_KEYS: [&str; 3] = ["name", "isTemplate", "template"];

/// Returns the child blueprint with its parent's fields as defaults.
pub fn inherit(parent: &Value, child: &Value) -> Value {
    let mut parent = parent.clone();
    if let Value::Mapping(map) = &mut parent {
        for key in OWN_KEYS {
            map.remove(key);
        }
    }
    merge(&parent, child)
}

fn merge(parent: &Value, child: &Value) -> Value {
    match (parent, child) {
        (_, Value::Tagged(tagged)) if is_replace(tagged) => strip_replace(&tagged.value),
        (Value::Mapping(parent), Value::Mapping(child)) => {
            let mut merged = parent.clone();
            for (key, value) in child {
                let value = match merged.get(key) {
                    Some(inherited) => merge(inherited, value),
                    None => strip_replace(value),
                };
                merged.insert(key.clone(), value);
            }
            Value::Mapping(merged)
        }
        (Value::Sequence(parent), Value::Sequence(child)) => {
            let mut merged = parent.clone();
            for item in child {
                let same_name = item_name(item)
                    .and_then(|name| merged.iter().position(|m| item_name(m) == Some(name)));
                match same_name {
                    Some(index) => merged[index] = merge(&merged[index], item),
                    None => merged.push(strip_replace(item)),
                }
            }
            Value::Sequence(merged)
        }
        (_, child) => strip_replace(child),
    }
}

fn is_replace(tagged: &TaggedValue) -> bool {
    tagged.tag == REPLACE_TAG
}

fn item_name(item: &Value) -> Option<&str> {
    item.get("name").and_then(Value::as_str)
}

/// Removes `!replace` markers left where there was nothing to replace.
fn strip_replace(value: &Value) -> Value {
    match value {
        Value::Tagged(tagged) if is_replace(tagged) => strip_replace(&tagged.value),
        Value::Tagged(tagged) => Value::Tagged(Box::new(TaggedValue {
            tag: tagged.tag.clone(),
            value: strip_replace(&tagged.value),
        })),
        Value::Mapping(map) => Value::Mapping(
            map.iter()
                .map(|(k, v)| (k.clone(), strip_replace(v)))
                .collect(),
        ),
        Value::Sequence(items) => Value::Sequence(items.iter().map(strip_replace).collect()),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml(text: &str) -> Value {
        serde_yaml_ng::from_str(text).unwrap()
    }

    #[test]
    fn maps_merge_lists_append_scalars_replace() {
        let parent = yaml(
            "name: base\nisTemplate: true\nimage: debian\nenv: {A: '1', B: '2'}\n\
             initScripts: [{name: one, script: a}]\nresources: {limits: {cpu: '1', memory: 1Gi}}",
        );
        let child = yaml(
            "name: dev\ntemplate: base\nimage: ubuntu\nenv: {B: '3', C: '4'}\n\
             initScripts: [{name: two, script: b}]\nresources: {limits: {memory: 2Gi}}",
        );
        let merged = inherit(&parent, &child);
        let want = yaml(
            "name: dev\ntemplate: base\nimage: ubuntu\nenv: {A: '1', B: '3', C: '4'}\n\
             initScripts: [{name: one, script: a}, {name: two, script: b}]\n\
             resources: {limits: {cpu: '1', memory: 2Gi}}",
        );
        assert_eq!(merged, want);
        assert!(
            merged.get("isTemplate").is_none(),
            "isTemplate is not inherited"
        );
    }

    #[test]
    fn named_items_merge_and_replace_overrides() {
        let parent = yaml(
            "storages: [{name: home, type: local, path: /home, size: 1Gi}]\n\
             env: {A: '1'}\ntolerations: [{key: x}]",
        );
        let child = yaml(
            "storages: [{name: home, size: 5Gi}, {name: cache, type: emptyDir, path: /cache}]\n\
             env: !replace {B: '2'}\ntolerations: !replace []",
        );
        let merged = inherit(&parent, &child);
        let want = yaml(
            "storages: [{name: home, type: local, path: /home, size: 5Gi}, {name: cache, type: emptyDir, path: /cache}]\n\
             env: {B: '2'}\ntolerations: []",
        );
        assert_eq!(merged, want);
    }

    #[test]
    fn cel_tags_survive_and_stray_replace_tags_vanish() {
        let parent = yaml("image: debian");
        let child = yaml("image: !cel \"'x'\"\nenv: !replace {A: !replace '1'}");
        let merged = inherit(&parent, &child);
        let Value::Tagged(image) = &merged["image"] else {
            panic!("{merged:?}")
        };
        assert_eq!(image.tag, "cel");
        assert_eq!(merged["env"], yaml("{A: '1'}"));
    }
}
