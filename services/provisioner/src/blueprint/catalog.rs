//! Loading a directory of blueprint files into a validated set. A set is
//! all or nothing: one broken file rejects the whole load, so a reload can
//! keep the last good set.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use serde_yaml_ng::Value;
use sha2::{Digest, Sha256};

use super::expr::Expr;
use super::merge::inherit;
use super::model::{Blueprint, StorageKind};

/// One problem in a blueprint file.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}: {}{}{message}", file.display(), blueprint.as_ref().map(|b| format!("blueprint {b:?}: ")).unwrap_or_default(), if path.is_empty() { String::new() } else { format!("{path}: ") })]
pub struct BlueprintError {
    /// The file.
    pub file: PathBuf,
    /// The blueprint, when the file could be read that far.
    pub blueprint: Option<String>,
    /// Field path (`storages[1].path`), when the error is in a field.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

/// A loaded blueprint and where it came from.
#[derive(Clone, Debug)]
pub struct LoadedBlueprint {
    /// The blueprint with its templates merged in.
    pub blueprint: Blueprint,
    /// The file that defines it.
    pub file: PathBuf,
}

/// A consistent set of blueprints.
#[derive(Clone, Debug, Default)]
pub struct BlueprintSet {
    blueprints: BTreeMap<String, Arc<LoadedBlueprint>>,
    /// Hash of the files the set was loaded from.
    pub fingerprint: String,
}

impl BlueprintSet {
    /// A blueprint by name (templates included).
    pub fn get(&self, name: &str) -> Option<&Arc<LoadedBlueprint>> {
        self.blueprints.get(name)
    }

    /// Every blueprint, by name.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<LoadedBlueprint>> {
        self.blueprints.values()
    }

    /// How many.
    pub fn len(&self) -> usize {
        self.blueprints.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.blueprints.is_empty()
    }
}

struct RawBlueprint {
    file: PathBuf,
    value: Value,
}

/// The YAML files of `dir`, sorted, and a hash of their names and contents.
pub fn read_dir(dir: &Path) -> Result<(Vec<(PathBuf, String)>, String), BlueprintError> {
    let unreadable = |message: String| BlueprintError {
        file: dir.to_owned(),
        blueprint: None,
        path: String::new(),
        message,
    };
    let entries = std::fs::read_dir(dir).map_err(|e| unreadable(e.to_string()))?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            // Editors' swap and backup files and hidden files are not blueprints.
            !name.starts_with('.') && p.extension().is_some_and(|e| e == "yaml" || e == "yml")
        })
        .collect();
    paths.sort();
    let mut hasher = Sha256::new();
    let mut files = Vec::with_capacity(paths.len());
    for path in paths {
        let text = std::fs::read_to_string(&path).map_err(|e| BlueprintError {
            file: path.clone(),
            blueprint: None,
            path: String::new(),
            message: format!("cannot read: {e}"),
        })?;
        hasher.update(path.to_string_lossy().as_bytes());
        hasher.update([0]);
        hasher.update(text.as_bytes());
        hasher.update([0]);
        files.push((path, text));
    }
    Ok((files, format!("{:x}", hasher.finalize())))
}

/// Loads and validates every blueprint in `dir`.
pub fn load_dir(dir: &Path) -> Result<BlueprintSet, Vec<BlueprintError>> {
    let (files, fingerprint) = read_dir(dir).map_err(|e| vec![e])?;
    let mut set = load_files(&files)?;
    set.fingerprint = fingerprint;
    Ok(set)
}

/// Loads and validates blueprints from `(file, text)` pairs.
pub fn load_files(files: &[(PathBuf, String)]) -> Result<BlueprintSet, Vec<BlueprintError>> {
    let mut errors = Vec::new();
    let mut raw: BTreeMap<String, RawBlueprint> = BTreeMap::new();
    for (file, text) in files {
        for document in serde_yaml_ng::Deserializer::from_str(text) {
            let error = |blueprint: Option<String>, message: String| BlueprintError {
                file: file.clone(),
                blueprint,
                path: String::new(),
                message,
            };
            let value = match Value::deserialize(document) {
                Ok(Value::Null) => continue, // an empty document
                Ok(value) => value,
                Err(e) => {
                    errors.push(error(None, format!("invalid YAML: {e}")));
                    break;
                }
            };
            let Some(name) = value.get("name").and_then(Value::as_str).map(str::to_owned) else {
                errors.push(error(None, "a blueprint needs a string `name`".to_owned()));
                continue;
            };
            if let Some(previous) = raw.get(&name) {
                errors.push(error(
                    Some(name.clone()),
                    format!("defined twice (also in {})", previous.file.display()),
                ));
                continue;
            }
            raw.insert(
                name,
                RawBlueprint {
                    file: file.clone(),
                    value,
                },
            );
        }
    }
    let mut resolved: BTreeMap<String, Value> = BTreeMap::new();
    for name in raw.keys() {
        if let Err(error) = resolve(name, &raw, &mut resolved, &mut Vec::new()) {
            errors.push(error);
        }
    }
    let mut blueprints = BTreeMap::new();
    for (name, value) in resolved {
        let Some(source) = raw.get(&name) else {
            continue;
        };
        match typed(&name, &source.file, value) {
            Ok(blueprint) => {
                blueprints.insert(
                    name,
                    Arc::new(LoadedBlueprint {
                        blueprint,
                        file: source.file.clone(),
                    }),
                );
            }
            Err(mut found) => errors.append(&mut found),
        }
    }
    if errors.is_empty() {
        Ok(BlueprintSet {
            blueprints,
            fingerprint: String::new(),
        })
    } else {
        errors.sort_by(|a, b| (&a.file, &a.blueprint).cmp(&(&b.file, &b.blueprint)));
        errors.dedup();
        Err(errors)
    }
}

/// Merges `name` with its chain of templates; `stack` detects cycles.
fn resolve(
    name: &str,
    raw: &BTreeMap<String, RawBlueprint>,
    resolved: &mut BTreeMap<String, Value>,
    stack: &mut Vec<String>,
) -> Result<Value, BlueprintError> {
    if let Some(done) = resolved.get(name) {
        return Ok(done.clone());
    }
    let Some(source) = raw.get(name) else {
        return Err(BlueprintError {
            file: PathBuf::new(),
            blueprint: Some(name.to_owned()),
            path: String::new(),
            message: "no such blueprint".to_owned(),
        });
    };
    let error = |path: &str, message: String| BlueprintError {
        file: source.file.clone(),
        blueprint: Some(name.to_owned()),
        path: path.to_owned(),
        message,
    };
    if stack.iter().any(|s| s == name) {
        stack.push(name.to_owned());
        return Err(error(
            "template",
            format!("template cycle: {}", stack.join(" → ")),
        ));
    }
    let value = match source.value.get("template") {
        None | Some(Value::Null) => source.value.clone(),
        Some(Value::String(parent)) => {
            if !raw.contains_key(parent) {
                return Err(error("template", format!("unknown template {parent:?}")));
            }
            stack.push(name.to_owned());
            let parent_value = resolve(parent, raw, resolved, stack);
            stack.pop();
            let parent_value = parent_value.map_err(|inner| {
                if inner.message.starts_with("template cycle") {
                    error("template", inner.message)
                } else {
                    error(
                        "template",
                        format!("template {parent:?} is broken: {}", inner.message),
                    )
                }
            })?;
            inherit(&parent_value, &source.value)
        }
        Some(_) => return Err(error("template", "must be a blueprint name".to_owned())),
    };
    resolved.insert(name.to_owned(), value.clone());
    Ok(value)
}

/// Types and validates a merged blueprint.
fn typed(name: &str, file: &Path, value: Value) -> Result<Blueprint, Vec<BlueprintError>> {
    let error = |path: String, message: String| BlueprintError {
        file: file.to_owned(),
        blueprint: Some(name.to_owned()),
        path,
        message,
    };
    let blueprint: Blueprint = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        vec![error(
            if path == "." { String::new() } else { path },
            e.into_inner().to_string(),
        )]
    })?;
    let errors: Vec<BlueprintError> = validate(&blueprint)
        .into_iter()
        .map(|(path, message)| error(path, message))
        .collect();
    if errors.is_empty() {
        Ok(blueprint)
    } else {
        Err(errors)
    }
}

/// `[a-z0-9-]`, starting with a letter, at most 63 characters.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Checks what types can't: names, uniqueness, literal values' formats.
fn validate(blueprint: &Blueprint) -> Vec<(String, String)> {
    let mut errors = Vec::new();
    if !valid_name(&blueprint.name) {
        errors.push((
            "name".to_owned(),
            "must be [a-z0-9-], start with a letter, at most 63 characters".to_owned(),
        ));
    }
    if !blueprint.is_template && blueprint.image.is_none() {
        errors.push((
            "image".to_owned(),
            "required (set it here or in a template)".to_owned(),
        ));
    }
    unique_names(
        "storages",
        blueprint.storages.iter().map(|s| s.name.as_str()),
        &mut errors,
    );
    unique_names(
        "initScripts",
        blueprint.init_scripts.iter().map(|s| s.name.as_str()),
        &mut errors,
    );
    unique_names(
        "apps",
        blueprint.apps.iter().map(|a| a.name.as_str()),
        &mut errors,
    );
    unique_names(
        "ports",
        blueprint.ports.iter().map(|p| p.name.as_str()),
        &mut errors,
    );
    let mut paths = BTreeSet::new();
    for (index, storage) in blueprint.storages.iter().enumerate() {
        if let Expr::Literal(path) = &storage.path {
            if !path.starts_with('/') {
                errors.push((
                    format!("storages[{index}].path"),
                    "must be an absolute path".to_owned(),
                ));
            } else if !paths.insert(path.clone()) {
                errors.push((
                    format!("storages[{index}].path"),
                    format!("{path} is mounted twice"),
                ));
            }
        }
        if storage.scope.is_some() && storage.kind != StorageKind::Shared {
            errors.push((
                format!("storages[{index}].scope"),
                "only shared storages have a scope".to_owned(),
            ));
        }
        if storage.retain && !matches!(storage.kind, StorageKind::Local) {
            errors.push((
                format!("storages[{index}].retain"),
                "only local storages can be retained (shared ones always are)".to_owned(),
            ));
        }
        if let Some(Expr::Literal(size)) = &storage.size
            && !valid_quantity(size)
        {
            errors.push((
                format!("storages[{index}].size"),
                format!("{size:?} is not a quantity like 10Gi"),
            ));
        }
    }
    for (which, amounts) in [
        ("requests", &blueprint.resources.requests),
        ("limits", &blueprint.resources.limits),
    ] {
        for (field, value) in [("cpu", &amounts.cpu), ("memory", &amounts.memory)] {
            if let Some(Expr::Literal(quantity)) = value
                && !valid_quantity(quantity)
            {
                errors.push((
                    format!("resources.{which}.{field}"),
                    format!("{quantity:?} is not a quantity like 500m, 2 or 4Gi"),
                ));
            }
        }
    }
    if let Some(Expr::Literal(timeout)) = &blueprint.idle_timeout
        && let Err(message) = parse_idle_timeout(timeout)
    {
        errors.push(("idleTimeout".to_owned(), message));
    }
    for (index, app) in blueprint.apps.iter().enumerate() {
        if let Some(restart) = &app.restart
            && !["always", "on-failure", "never"].contains(&restart.as_str())
        {
            errors.push((
                format!("apps[{index}].restart"),
                format!("{restart:?} is not always, on-failure or never"),
            ));
        }
        if let Some(protocol) = &app.protocol
            && !["http", "tcp"].contains(&protocol.as_str())
        {
            errors.push((
                format!("apps[{index}].protocol"),
                format!("{protocol:?} is not http or tcp"),
            ));
        }
    }
    for (index, port) in blueprint.ports.iter().enumerate() {
        if port.port == 0 {
            errors.push((format!("ports[{index}].port"), "must be 1-65535".to_owned()));
        }
    }
    errors
}

fn unique_names<'a>(
    field: &str,
    names: impl Iterator<Item = &'a str>,
    errors: &mut Vec<(String, String)>,
) {
    let mut seen = BTreeSet::new();
    for (index, name) in names.enumerate() {
        if !valid_name(name) {
            errors.push((
                format!("{field}[{index}].name"),
                format!("{name:?} must be [a-z0-9-] and start with a letter"),
            ));
        } else if !seen.insert(name) {
            errors.push((
                format!("{field}[{index}].name"),
                format!("{name:?} is used twice"),
            ));
        }
    }
}

/// A Kubernetes quantity: a decimal number with an optional suffix.
pub fn valid_quantity(value: &str) -> bool {
    const SUFFIXES: [&str; 14] = [
        "Ki", "Mi", "Gi", "Ti", "Pi", "Ei", "m", "k", "M", "G", "T", "P", "E", "",
    ];
    SUFFIXES.iter().any(|suffix| {
        value.strip_suffix(suffix).is_some_and(|number| {
            let mut parts = number.splitn(2, '.');
            let whole = parts.next().unwrap_or("");
            let fraction = parts.next();
            !whole.is_empty()
                && whole.bytes().all(|b| b.is_ascii_digit())
                && fraction.is_none_or(|f| !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()))
        })
    })
}

/// `0`, `never` or a humantime duration; `None` means never.
pub fn parse_idle_timeout(value: &str) -> Result<Option<std::time::Duration>, String> {
    match value.trim() {
        "0" | "never" | "" => Ok(None),
        other => humantime::parse_duration(other)
            .map(Some)
            .map_err(|e| format!("{other:?} is not a duration like 30m or 2h: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(files: &[(&str, &str)]) -> Result<BlueprintSet, Vec<BlueprintError>> {
        let files: Vec<(PathBuf, String)> = files
            .iter()
            .map(|(f, t)| (PathBuf::from(f), (*t).to_owned()))
            .collect();
        load_files(&files)
    }

    const BASE: &str = "name: base\nisTemplate: true\nimage: debian\nenv: {EDITOR: vi}\n\
                        storages:\n- {name: home, type: local, path: /home, retain: true}\n";

    #[test]
    fn templates_resolve_across_files() {
        let set = load(&[
            ("base.yaml", BASE),
            (
                "dev.yaml",
                "name: dev\ntemplate: base\nenv: {LANG: C.UTF-8}\n---\nname: ops\ntemplate: dev\nidleTimeout: 2h\n",
            ),
        ])
        .unwrap();
        assert_eq!(set.len(), 3);
        let ops = &set.get("ops").unwrap().blueprint;
        assert!(!ops.is_template);
        assert_eq!(ops.env.len(), 2);
        assert_eq!(ops.storages.len(), 1);
        assert_eq!(set.get("ops").unwrap().file, PathBuf::from("dev.yaml"));
        assert!(set.get("base").unwrap().blueprint.is_template);
    }

    #[test]
    fn errors_name_file_blueprint_and_field() {
        let errors = load(&[
            ("base.yaml", BASE),
            (
                "bad.yaml",
                "name: bad\ntemplate: base\nstorages:\n- {name: home, path: relative}\n- {name: x, type: disk, path: /x}\n",
            ),
        ])
        .unwrap_err();
        assert_eq!(errors.len(), 1, "{errors:?}");
        let error = &errors[0];
        assert_eq!(error.file, PathBuf::from("bad.yaml"));
        assert_eq!(error.blueprint.as_deref(), Some("bad"));
        assert_eq!(error.path, "storages[1].type");
        assert!(error.message.contains("disk"), "{error}");
        assert!(
            error
                .to_string()
                .starts_with("bad.yaml: blueprint \"bad\": storages[1].type: "),
            "{error}"
        );

        let errors = load(&[(
            "v.yaml",
            "name: v\nimage: x\nstorages:\n- {name: a, type: local, path: rel}\n- {name: a, type: shared, path: /s, retain: true}\n\
             resources: {limits: {memory: lots}}\nidleTimeout: soon\nunknownField: 1\n",
        )])
        .unwrap_err();
        assert_eq!(errors[0].path, "unknownField", "{errors:?}");
        assert!(errors[0].message.contains("unknown field"), "{errors:?}");

        let errors = load(&[(
            "v.yaml",
            "name: v\nimage: x\nstorages:\n- {name: a, type: local, path: rel}\n- {name: a, type: shared, path: /s, retain: true}\n\
             resources: {limits: {memory: lots}}\nidleTimeout: soon\n",
        )])
        .unwrap_err();
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "storages[1].name",
                "storages[0].path",
                "storages[1].retain",
                "resources.limits.memory",
                "idleTimeout"
            ],
            "{errors:?}"
        );
    }

    #[test]
    fn cycles_unknown_templates_and_duplicates_are_rejected() {
        let errors = load(&[(
            "c.yaml",
            "name: a\ntemplate: b\nimage: x\n---\nname: b\ntemplate: a\n",
        )])
        .unwrap_err();
        assert!(
            errors.iter().all(|e| e.message.contains("template cycle")),
            "{errors:?}"
        );
        let errors = load(&[("u.yaml", "name: a\ntemplate: nope\nimage: x\n")]).unwrap_err();
        assert_eq!(errors[0].path, "template");
        assert!(errors[0].message.contains("unknown template \"nope\""));
        let errors = load(&[
            ("1.yaml", "name: a\nimage: x\n"),
            ("2.yaml", "name: a\nimage: y\n"),
        ])
        .unwrap_err();
        assert!(
            errors[0].message.contains("defined twice (also in 1.yaml)"),
            "{errors:?}"
        );
        let errors = load(&[("t.yaml", "name: a\nimage: [unclosed\n")]).unwrap_err();
        assert!(errors[0].message.starts_with("invalid YAML"), "{errors:?}");
        let errors = load(&[("n.yaml", "name: Not_Valid\nimage: x\n")]).unwrap_err();
        assert_eq!(errors[0].path, "name");
    }

    #[test]
    fn quantities_and_timeouts() {
        for ok in ["1", "500m", "2Gi", "1.5", "100Mi", "0.25"] {
            assert!(valid_quantity(ok), "{ok}");
        }
        for bad in ["", "Gi", "1.", ".5", "1gb", "-1", "1 Gi"] {
            assert!(!valid_quantity(bad), "{bad}");
        }
        assert_eq!(parse_idle_timeout("never").unwrap(), None);
        assert_eq!(
            parse_idle_timeout("90m").unwrap(),
            Some(std::time::Duration::from_secs(5400))
        );
        assert!(parse_idle_timeout("soon").is_err());
    }
}
