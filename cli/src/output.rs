//! Writing results to stdout: the table text or one JSON value.

use std::io::Write;

use serde_json::Value;

use crate::OutputFormat;
use crate::error::CliError;

/// Writes to stdout; a closed pipe (`gpupool ... | head`) is not an error.
pub(crate) fn emit_bytes(bytes: &[u8]) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(CliError::Message(format!("cannot write to stdout: {e}"))),
    }
}

/// Prints the table text, or the JSON value (pretty, one value).
pub(crate) fn emit(
    output: OutputFormat,
    table: impl FnOnce() -> String,
    json: impl FnOnce() -> Value,
) -> Result<(), CliError> {
    let text = match output {
        OutputFormat::Table => table(),
        OutputFormat::Json => format!("{:#}\n", json()),
    };
    emit_bytes(text.as_bytes())
}
