// jsgreet: a tiny uet tool plugin in JavaScript.
//
// Built into a WebAssembly component by componentize-js from the repository's wit/plugin.wit
// (see build.sh). The world `plugin` imports `uet:plugin/host` and exports `uet:plugin/tool`:
// this module exports `tool` with `describe` and `run`.

import { log } from 'uet:plugin/host@0.1.0';

const NAME = 'jsgreet';
const VERSION = '0.1.0';
const CAPABILITIES = ['example.js'];
const INPUT_SCHEMA = {
  type: 'object',
  properties: {
    name: { type: 'string', description: 'who to greet' },
    shout: { type: 'boolean', description: 'upper-case the greeting' },
  },
  required: ['name'],
};

// A run-error that no retry can fix (bad input). Throwing it from `run` makes the WIT
// `result` an `err`.
function fatal(message) {
  return { message, retryable: false };
}

export const tool = {
  describe() {
    return {
      name: NAME,
      version: VERSION,
      capabilities: [...CAPABILITIES],
      inputSchema: JSON.stringify(INPUT_SCHEMA),
    };
  },

  run(input) {
    let args;
    try {
      args = JSON.parse(input);
    } catch (e) {
      throw fatal(`invalid input: ${e.message}`);
    }
    if (args === null || typeof args !== 'object' || Array.isArray(args)) {
      throw fatal('invalid input: expected a JSON object');
    }
    const name = args.name;
    if (typeof name !== 'string' || name === '') {
      throw fatal('invalid input: `name` (a non-empty string) is required');
    }

    log('info', `greeting ${name}`);
    let greeting = `hello, ${name}`;
    if (args.shout === true) {
      greeting = `${greeting.toUpperCase()}!`;
    }
    return JSON.stringify({ greeting, language: 'javascript' });
  },
};
