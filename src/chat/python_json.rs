//! JSON text exactly as Python's `json.dumps(x, ensure_ascii=False)` writes it,
//! which is what transformers' `tojson` template filter produces. Matching it
//! byte for byte keeps our chat prompts token-identical to transformers'.

use serde_json::Value;

/// `json.dumps(value, ensure_ascii=False, indent=indent)`.
pub fn dumps(value: &Value, indent: Option<usize>) -> String {
    let mut out = String::new();
    write_value(&mut out, value, indent, 0);
    out
}

fn write_value(out: &mut String, value: &Value, indent: Option<usize>, depth: usize) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&python_number(n)),
        Value::String(s) => out.push_str(&Value::String(s.clone()).to_string()),
        Value::Array(items) => {
            if items.is_empty() {
                out.push_str("[]");
                return;
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                separator(out, i, indent, depth + 1);
                write_value(out, item, indent, depth + 1);
            }
            close(out, ']', indent, depth);
        }
        Value::Object(map) => {
            if map.is_empty() {
                out.push_str("{}");
                return;
            }
            out.push('{');
            for (i, (k, v)) in map.iter().enumerate() {
                separator(out, i, indent, depth + 1);
                out.push_str(&Value::String(k.clone()).to_string());
                out.push_str(": ");
                write_value(out, v, indent, depth + 1);
            }
            close(out, '}', indent, depth);
        }
    }
}

/// Python writes `", "` between items on one line, or `","` plus a newline
/// and indentation when indenting.
fn separator(out: &mut String, index: usize, indent: Option<usize>, depth: usize) {
    match indent {
        None => {
            if index > 0 {
                out.push_str(", ");
            }
        }
        Some(width) => {
            if index > 0 {
                out.push(',');
            }
            out.push('\n');
            out.push_str(&" ".repeat(width * depth));
        }
    }
}

fn close(out: &mut String, bracket: char, indent: Option<usize>, depth: usize) {
    if let Some(width) = indent {
        out.push('\n');
        out.push_str(&" ".repeat(width * depth));
    }
    out.push(bracket);
}

/// Python prints floats with `repr`: integral floats keep `.0`, and huge or
/// tiny ones use exponents like `1e+20`.
fn python_number(n: &serde_json::Number) -> String {
    if n.is_i64() || n.is_u64() {
        return n.to_string();
    }
    let f = n.as_f64().unwrap_or(0.0);
    if f.is_finite() && f.fract() == 0.0 && f.abs() < 1e16 {
        return format!("{f:.1}");
    }
    let s = n.to_string();
    // serde writes `1e20`; Python writes `1e+20`.
    match s.find('e') {
        Some(pos) if !s[pos + 1..].starts_with('-') => format!("{}e+{}", &s[..pos], &s[pos + 1..]),
        _ => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn matches_python_separators_and_order() {
        let v: Value = serde_json::from_str(
            r#"{"name": "get_weather", "arguments": {"city": "Zürich", "days": 3, "x": 1.0}}"#,
        )
        .unwrap();
        assert_eq!(
            dumps(&v, None),
            r#"{"name": "get_weather", "arguments": {"city": "Zürich", "days": 3, "x": 1.0}}"#
        );
        assert_eq!(
            dumps(&json!({"a": [1, {}], "b": []}), Some(2)),
            "{\n  \"a\": [\n    1,\n    {}\n  ],\n  \"b\": []\n}"
        );
        assert_eq!(dumps(&json!("<b>\n\"q\""), None), "\"<b>\\n\\\"q\\\"\"");
    }
}
