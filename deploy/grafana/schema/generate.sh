#!/bin/sh
# Regenerates the JSON schemas in this folder from Grafana's own TypeScript types
# (@grafana/schema, pinned in package.json): the dashboard model, and the options and field
# config of the panel types deploy/grafana/flexor.json uses. tests/deploy/test_grafana.py
# validates the dashboard against them. Needs node and npm; run it after raising the pin.
set -eu
cd "$(dirname "$0")"
npm ci --silent --no-audit --no-fund
raw=node_modules/@grafana/schema/dist/types/raw
gen() { npx --no-install ts-json-schema-generator --no-type-check --path "$1" --type "$2" -o "$3"; }
gen "$raw/dashboard/x/types.gen.d.ts" Dashboard dashboard.schema.json
gen "$raw/composable/timeseries/panelcfg/x/types.gen.d.ts" Options timeseries-options.schema.json
gen "$raw/composable/timeseries/panelcfg/x/types.gen.d.ts" FieldConfig timeseries-fieldconfig.schema.json
gen "$raw/composable/stat/panelcfg/x/types.gen.d.ts" Options stat-options.schema.json
