//! `[notify] webhook` and `--webhook`: a URL that is a credential, checked
//! without ever being shown.

/// `[notify] webhook` and `--webhook`: an http:// or https:// URL with a
/// host. The problem is said without the value (it is a credential, even
/// mistyped): "not an http(s) URL: invalid port number (value hidden)".
pub fn parse_webhook_url(text: &str) -> Result<String, String> {
    let hidden = |why: &str| format!("not an http(s) URL: {why} (value hidden)");
    // url's ParseError texts are fixed ("invalid port number"): no input.
    let url = reqwest::Url::parse(text).map_err(|e| hidden(&e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(hidden("the scheme is not http or https"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(hidden("no host"));
    }
    Ok(text.to_string())
}

/// A webhook URL, checked by [`parse_webhook_url`]. A credential (whoever has it
/// can post to the channel): its `Debug` says only that it is hidden, and
/// it has no `Display`, so it cannot end up in a log line, an error or a
/// report by a `{:?}` of the config or the command line.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookUrl(String);

impl WebhookUrl {
    pub fn parse(text: &str) -> Result<WebhookUrl, String> {
        parse_webhook_url(text).map(WebhookUrl)
    }

    /// The URL itself, for the HTTP client alone.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for WebhookUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WebhookUrl(hidden)")
    }
}
