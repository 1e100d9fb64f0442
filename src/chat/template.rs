//! Hugging Face chat templates (Jinja) rendered with minijinja, configured the
//! way transformers configures Jinja2: `trim_blocks`, `lstrip_blocks`, loop
//! controls, Python string/dict methods, `raise_exception` and a `tojson` that
//! writes Python's `json.dumps` format.

use super::{python_json, ChatError};
use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Kwargs, Serde, Value};
use minijinja::{Environment, Error, ErrorKind};
use serde_json::{Map, Value as Json};

const TEMPLATE_NAME: &str = "chat_template";

pub struct ChatTemplate {
    env: Environment<'static>,
    special_tokens: Map<String, Json>,
}

fn tojson(value: Value, kwargs: Kwargs) -> Result<String, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let json = serde_json::to_value(&value)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    Ok(python_json::dumps(&json, indent))
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

impl ChatTemplate {
    /// Compiles `source`. `special_tokens` (e.g. `bos_token`, `eos_token`) are
    /// passed to every render, as transformers does.
    pub fn new(source: String, special_tokens: Map<String, Json>) -> Result<Self, ChatError> {
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| ChatError::Template(e.to_string()))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned(TEMPLATE_NAME, source)
            .map_err(|e| ChatError::Template(format!("cannot compile chat template: {e:#}")))?;
        Ok(Self {
            env,
            special_tokens,
        })
    }

    /// Renders the conversation. `extra` holds template kwargs such as
    /// `enable_thinking`; the named arguments take precedence over them.
    pub fn render(
        &self,
        messages: &Json,
        tools: Option<&Json>,
        add_generation_prompt: bool,
        extra: &Map<String, Json>,
    ) -> Result<String, ChatError> {
        let mut ctx = self.special_tokens.clone();
        ctx.extend(extra.clone());
        ctx.insert("messages".into(), messages.clone());
        ctx.insert("tools".into(), tools.cloned().unwrap_or(Json::Null));
        ctx.insert(
            "add_generation_prompt".into(),
            Json::Bool(add_generation_prompt),
        );
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| ChatError::Template(e.to_string()))?;
        template
            .render(Value::from(Serde(&ctx)))
            .map_err(|e| ChatError::Template(render_error_message(&e)))
    }
}

/// `raise_exception` messages are the template author's words to the user:
/// pass them through unadorned; other errors keep minijinja's detail.
fn render_error_message(e: &Error) -> String {
    match (e.kind(), e.detail()) {
        (ErrorKind::InvalidOperation, Some(detail)) => detail.to_string(),
        _ => format!("chat template error: {e:#}"),
    }
}
