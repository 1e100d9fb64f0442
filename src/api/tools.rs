//! `tools` and `tool_choice` of a chat request, checked before the template
//! sees them: a malformed entry would otherwise render as an empty tool and
//! prompt the model with something the client never meant.

use super::error::ApiError;
use serde_json::Value;

/// What the request lets the model do with its tools.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolUse {
    /// No tools, or `tool_choice: "none"`: tool calls are not parsed.
    Off,
    /// `tool_choice: "auto"` (the default with tools).
    Auto,
}

fn bad(message: String, param: &str) -> ApiError {
    ApiError::bad_request(message, Some(param))
}

/// Checks one `tools[i]`: `{"type": "function", "function": {"name", ...}}`.
fn check_tool(i: usize, tool: &Value) -> Result<(), ApiError> {
    let param = format!("tools[{i}]");
    let obj = tool
        .as_object()
        .ok_or_else(|| bad(format!("{param} must be an object"), &param))?;
    match obj.get("type").and_then(Value::as_str) {
        Some("function") => {}
        Some(other) => {
            return Err(bad(
                format!("{param}.type {other:?} is not supported (only \"function\")"),
                &format!("{param}.type"),
            ))
        }
        None => {
            return Err(bad(
                format!("{param}.type must be \"function\""),
                &format!("{param}.type"),
            ))
        }
    }
    let param = format!("{param}.function");
    let function = obj
        .get("function")
        .and_then(Value::as_object)
        .ok_or_else(|| bad(format!("{param} must be an object"), &param))?;
    match function.get("name").and_then(Value::as_str) {
        Some(name) if !name.is_empty() => {}
        _ => {
            return Err(bad(
                format!("{param}.name must be a non-empty string"),
                &format!("{param}.name"),
            ))
        }
    }
    for key in ["parameters", "description"] {
        let ok = match (key, function.get(key)) {
            (_, None | Some(Value::Null)) => true,
            ("parameters", Some(v)) => v.is_object(),
            (_, Some(v)) => v.is_string(),
        };
        if !ok {
            let kind = if key == "parameters" {
                "an object"
            } else {
                "a string"
            };
            return Err(bad(
                format!("{param}.{key} must be {kind}"),
                &format!("{param}.{key}"),
            ));
        }
    }
    Ok(())
}

/// Validates `tools` (a list of function tools, or null) and returns them.
pub fn checked_tools(tools: Option<&Value>) -> Result<Option<&Value>, ApiError> {
    match tools {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(list)) => {
            for (i, tool) in list.iter().enumerate() {
                check_tool(i, tool)?;
            }
            Ok(tools)
        }
        Some(_) => Err(bad("tools must be a list".into(), "tools")),
    }
}

/// Reads `tool_choice`. `"required"` and a named function would need
/// constrained decoding, which the engine does not do: they are refused rather
/// than silently treated as `"auto"`.
pub fn tool_use(tools: Option<&Value>, tool_choice: Option<&Value>) -> Result<ToolUse, ApiError> {
    let choice = match tool_choice {
        None | Some(Value::Null) => "auto",
        Some(Value::String(s)) => s.as_str(),
        Some(Value::Object(_)) => {
            return Err(bad(
                "tool_choice naming a function is not supported (use \"auto\" or \"none\")".into(),
                "tool_choice",
            ))
        }
        Some(_) => {
            return Err(bad(
                "tool_choice must be \"auto\", \"none\" or \"required\"".into(),
                "tool_choice",
            ))
        }
    };
    match choice {
        "none" => Ok(ToolUse::Off),
        "auto"
            if tools
                .and_then(Value::as_array)
                .is_some_and(|t| !t.is_empty()) =>
        {
            Ok(ToolUse::Auto)
        }
        "auto" => Ok(ToolUse::Off),
        "required" => Err(bad(
            "tool_choice \"required\" is not supported (use \"auto\" or \"none\")".into(),
            "tool_choice",
        )),
        other => Err(bad(
            format!("tool_choice {other:?} is not one of \"auto\", \"none\", \"required\""),
            "tool_choice",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn malformed_tools_are_named() {
        let param = |v: Value| match checked_tools(Some(&v)) {
            Err(ApiError::BadRequest { param, .. }) => param.unwrap_or_default(),
            other => panic!("{other:?}"),
        };
        assert_eq!(param(json!([{"type": "function"}])), "tools[0].function");
        assert_eq!(param(json!({"a": 1})), "tools");
        assert_eq!(
            param(
                json!([{"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {}}])
            ),
            "tools[1].function.name"
        );
        assert_eq!(
            param(json!([{"type": "function", "function": {"name": "f", "parameters": "x"}}])),
            "tools[0].function.parameters"
        );
        let good = json!([{"type": "function", "function": {"name": "f", "parameters": {}}}]);
        assert!(checked_tools(Some(&good)).unwrap().is_some());
        assert!(checked_tools(Some(&json!(null))).unwrap().is_none());
    }

    #[test]
    fn tool_choice_is_auto_none_or_refused() {
        let tools = json!([{"type": "function", "function": {"name": "f"}}]);
        assert_eq!(tool_use(Some(&tools), None).unwrap(), ToolUse::Auto);
        assert_eq!(tool_use(Some(&json!([])), None).unwrap(), ToolUse::Off);
        assert_eq!(tool_use(None, None).unwrap(), ToolUse::Off);
        assert_eq!(
            tool_use(Some(&tools), Some(&json!("none"))).unwrap(),
            ToolUse::Off
        );
        assert!(tool_use(Some(&tools), Some(&json!("required"))).is_err());
        assert!(tool_use(
            Some(&tools),
            Some(&json!({"type": "function", "function": {"name": "f"}}))
        )
        .is_err());
    }
}
