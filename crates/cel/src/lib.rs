//! CEL helpers shared by the services that evaluate operator-written
//! expressions: the provisioner's blueprints and identity's OIDC claim
//! mapping.

use std::collections::HashMap;
use std::sync::Arc;

use cel_interpreter::Value as Cel;

/// JSON to CEL, with integers as CEL `int` (not `uint`, which is what a
/// generic conversion makes of non-negative numbers, and which CEL refuses
/// to add to the literal `1`).
pub fn json_to_cel(value: &serde_json::Value) -> Cel {
    match value {
        serde_json::Value::Null => Cel::Null,
        serde_json::Value::Bool(b) => Cel::Bool(*b),
        serde_json::Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => Cel::Int(i),
            (None, Some(u), _) => Cel::UInt(u),
            (_, _, Some(f)) => Cel::Float(f),
            _ => Cel::Null,
        },
        serde_json::Value::String(s) => Cel::String(Arc::new(s.clone())),
        serde_json::Value::Array(items) => {
            Cel::List(Arc::new(items.iter().map(json_to_cel).collect()))
        }
        serde_json::Value::Object(map) => {
            let map: HashMap<String, Cel> = map
                .iter()
                .map(|(k, v)| (k.clone(), json_to_cel(v)))
                .collect();
            Cel::from(map)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_are_signed_so_arithmetic_with_literals_works() {
        let mut context = cel_interpreter::Context::default();
        context.add_variable_from_value("v", json_to_cel(&serde_json::json!({"n": 41})));
        let program = cel_interpreter::Program::compile("v.n + 1").expect("compiles");
        assert_eq!(program.execute(&context).expect("runs"), Cel::Int(42));
    }

    #[test]
    fn nested_values_convert() {
        let value = json_to_cel(&serde_json::json!({"a": [true, null, "x", 1.5]}));
        let mut context = cel_interpreter::Context::default();
        context.add_variable_from_value("v", value);
        let program = cel_interpreter::Program::compile("v.a[0] && v.a[2] == 'x' && v.a[3] > 1.0")
            .expect("compiles");
        assert_eq!(program.execute(&context).expect("runs"), Cel::Bool(true));
    }
}
