//! Blueprint values that may be CEL expressions (`!cel "user.username"`),
//! compiled when the blueprint loads and evaluated at provision time.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

use cel_interpreter::{Context, ExecutionError, Program};
use k8shell_cel::json_to_cel;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer};
use serde_yaml_ng::Value;

/// The YAML tag that marks a CEL expression.
pub const CEL_TAG: &str = "cel";

/// A literal value or a CEL expression producing one.
#[derive(Clone, Debug)]
pub enum Expr<T> {
    /// Written as is.
    Literal(T),
    /// Evaluated per workspace.
    Cel(CelExpr),
}

/// A compiled CEL expression with its source (for error messages).
#[derive(Clone)]
pub struct CelExpr {
    source: String,
    program: Arc<Program>,
}

impl std::fmt::Debug for CelExpr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "!cel {:?}", self.source)
    }
}

impl CelExpr {
    /// Compiles `source`; a syntax error names the expression.
    pub fn compile(source: &str) -> Result<Self, String> {
        let program = Program::compile(source)
            .map_err(|e| format!("invalid CEL expression {source:?}: {e}"))?;
        Ok(Self {
            source: source.to_owned(),
            program: Arc::new(program),
        })
    }

    /// The expression as written.
    pub fn source(&self) -> &str {
        &self.source
    }
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for Expr<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // Through a YAML value, so the `!cel` tag survives whatever
        // deserializer (file, merged tree) feeds us.
        let value = Value::deserialize(deserializer)?;
        match value {
            Value::Tagged(tagged) if tagged.tag == CEL_TAG => match tagged.value {
                Value::String(source) => CelExpr::compile(&source)
                    .map(Expr::Cel)
                    .map_err(D::Error::custom),
                _ => Err(D::Error::custom("a !cel value must be a string")),
            },
            Value::Tagged(tagged) => Err(D::Error::custom(format!(
                "unknown tag {}; only !cel is allowed here",
                tagged.tag
            ))),
            other => serde_yaml_ng::from_value(other)
                .map(Expr::Literal)
                .map_err(D::Error::custom),
        }
    }
}

impl<T: JsonSchema> JsonSchema for Expr<T> {
    fn schema_name() -> Cow<'static, str> {
        format!("Expr_{}", T::schema_name()).into()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        let literal = generator.subschema_for::<T>();
        json_schema!({
            "anyOf": [
                literal,
                {
                    "type": "string",
                    "description": "A CEL expression, tagged `!cel`; `user`, `workspace`, `metadata` and `env(name)` are in scope."
                }
            ]
        })
    }
}

/// What a CEL expression can see at provision time.
#[derive(Clone, Debug, Default)]
pub struct CelScope {
    /// `user`: `username`, `email`, `groups`, ...
    pub user: serde_json::Value,
    /// `workspace`: `id`, `blueprint`, ...
    pub workspace: serde_json::Value,
    /// `metadata`: free-form key/values from the create request.
    pub metadata: BTreeMap<String, String>,
    /// What `env(name)` can read: only what the operator allowed (never the
    /// provisioner's whole environment, which holds its secrets).
    pub env: BTreeMap<String, String>,
}

/// A CEL expression failed at provision time.
#[derive(Debug, thiserror::Error)]
#[error("{path}: CEL expression {source_text:?} failed: {message}")]
pub struct EvalError {
    /// Field path in the blueprint.
    pub path: String,
    /// The expression.
    pub source_text: String,
    /// Why.
    pub message: String,
}

/// Evaluates expressions of one workspace.
pub struct Evaluator {
    context: Context<'static>,
}

impl Evaluator {
    /// Builds the evaluation context from `scope`.
    pub fn new(scope: &CelScope) -> Result<Self, String> {
        let mut context = Context::default();
        context.add_variable_from_value("user", json_to_cel(&scope.user));
        context.add_variable_from_value("workspace", json_to_cel(&scope.workspace));
        let metadata = serde_json::to_value(&scope.metadata).map_err(|e| e.to_string())?;
        context.add_variable_from_value("metadata", json_to_cel(&metadata));
        let env = Arc::new(scope.env.clone());
        context.add_function(
            "env",
            move |name: Arc<String>| -> Result<Arc<String>, ExecutionError> {
                env.get(name.as_str())
                    .map(|v| Arc::new(v.clone()))
                    .ok_or_else(|| {
                        ExecutionError::function_error(
                            "env",
                            format!("{name} is not in the provisioner's blueprint_env"),
                        )
                    })
            },
        );
        Ok(Self { context })
    }

    /// Evaluates `expr` into a `T`, or returns the literal.
    pub fn eval<T: DeserializeOwned + Clone>(
        &self,
        path: &str,
        expr: &Expr<T>,
    ) -> Result<T, EvalError> {
        let cel = match expr {
            Expr::Literal(value) => return Ok(value.clone()),
            Expr::Cel(cel) => cel,
        };
        let error = |message: String| EvalError {
            path: path.to_owned(),
            source_text: cel.source.clone(),
            message,
        };
        let value = cel
            .program
            .execute(&self.context)
            .map_err(|e| error(e.to_string()))?;
        let json = value.json().map_err(|e| error(format!("{e:?}")))?;
        // A number where a string is wanted is converted: `!cel "user.uid"`
        // for an env value is the obvious intent.
        let json = match json {
            serde_json::Value::Number(n) if wants_string::<T>() => {
                serde_json::Value::String(n.to_string())
            }
            serde_json::Value::Bool(b) if wants_string::<T>() => {
                serde_json::Value::String(b.to_string())
            }
            other => other,
        };
        serde_json::from_value(json.clone())
            .map_err(|e| error(format!("result {json} has the wrong type: {e}")))
    }
}

fn wants_string<T: DeserializeOwned>() -> bool {
    serde_json::from_value::<T>(serde_json::Value::String(String::new())).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope() -> CelScope {
        CelScope {
            user: serde_json::json!({"username": "alice", "uid": 1234, "groups": ["dev", "ops"]}),
            workspace: serde_json::json!({"id": "alice-1234567", "blueprint": "dev"}),
            metadata: BTreeMap::from([("team".to_owned(), "core".to_owned())]),
            env: BTreeMap::from([("REGION".to_owned(), "eu".to_owned())]),
        }
    }

    fn parse<T: DeserializeOwned>(yaml: &str) -> Expr<T> {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    #[test]
    fn literals_and_expressions_of_every_scope() {
        let evaluator = Evaluator::new(&scope()).unwrap();
        let cases: Vec<(&str, &str)> = vec![
            ("plain", "plain"),
            ("!cel \"user.username + '-dev'\"", "alice-dev"),
            ("!cel \"workspace.id\"", "alice-1234567"),
            ("!cel \"metadata.team\"", "core"),
            ("!cel \"env('REGION')\"", "eu"),
            ("!cel \"'ops' in user.groups ? 'big' : 'small'\"", "big"),
            ("!cel \"user.uid\"", "1234"),
        ];
        for (yaml, want) in cases {
            let expr: Expr<String> = parse(yaml);
            assert_eq!(evaluator.eval("f", &expr).unwrap(), want, "{yaml}");
        }
        let uid: Expr<u32> = parse("!cel \"user.uid + 1\"");
        assert_eq!(evaluator.eval("f", &uid).unwrap(), 1235);
    }

    #[test]
    fn errors_name_the_field_and_the_expression() {
        let evaluator = Evaluator::new(&scope()).unwrap();
        let missing: Expr<String> = parse("!cel \"env('SECRET')\"");
        let error = evaluator.eval("env.TOKEN", &missing).unwrap_err();
        assert_eq!(error.path, "env.TOKEN");
        assert!(error.to_string().contains("SECRET"), "{error}");
        let wrong_type: Expr<u32> = parse("!cel \"user.username\"");
        let error = evaluator.eval("user.uid", &wrong_type).unwrap_err();
        assert!(error.to_string().contains("wrong type"), "{error}");
        // Syntax errors are found at load time.
        let broken = serde_yaml_ng::from_str::<Expr<String>>("!cel \"user.(\"").unwrap_err();
        assert!(broken.to_string().contains("invalid CEL"), "{broken}");
        let other_tag = serde_yaml_ng::from_str::<Expr<String>>("!js \"1\"").unwrap_err();
        assert!(other_tag.to_string().contains("only !cel"), "{other_tag}");
    }
}
