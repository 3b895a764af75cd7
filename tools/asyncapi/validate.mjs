// Parses an AsyncAPI document with the AsyncAPI Initiative's parser (schema validation, $ref
// resolution, its spectral rules) and prints one JSON object: the diagnostics and what the document
// declares (channels, operations, messages), so the Python test can check both.
import { Parser, fromFile } from '@asyncapi/parser';

const parser = new Parser();
const { document, diagnostics } = await fromFile(parser, process.argv[2]).parse();
const summary = {
  parsed: Boolean(document),
  diagnostics: diagnostics.map((d) => ({ severity: d.severity, code: d.code, message: d.message, path: d.path })),
};
if (document) {
  summary.version = document.version();
  summary.channels = document.channels().all().map((c) => ({
    id: c.id(),
    address: c.address(),
    messages: c.messages().all().map((m) => ({
      name: m.name(),
      contentType: m.contentType(),
      headers: m.hasHeaders() ? Object.keys(m.headers().properties() || {}) : [],
      requiredHeaders: m.hasHeaders() ? (m.headers().required() || []) : [],
      payloadProperties: Object.keys(m.payload()?.properties() || {}),
      key: m.bindings().get('kafka')?.value()?.key ?? null,
    })),
  }));
  summary.operations = document.operations().all().map((o) => ({
    id: o.id(),
    action: o.action(),
    channels: o.channels().all().map((c) => c.address()),
    kafka: o.bindings().get('kafka')?.value() ?? null,
  }));
}
console.log(JSON.stringify(summary));
process.exit(document ? 0 : 1);
