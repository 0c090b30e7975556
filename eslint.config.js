// ESLint flat config: the recommended JavaScript and typescript-eslint rules over the whole tree.
// Formatting is Prettier's (`npm run format:check`), so there are no stylistic rules here.
import js from '@eslint/js';
import globals from 'globals';
import tseslint from 'typescript-eslint';

export default tseslint.config(
  { ignores: ['dist/', 'coverage/', '.data/', '**/node_modules/', 'test/fixtures/packed-*/'] },
  js.configs.recommended,
  ...tseslint.configs.recommended,
  {
    languageOptions: { ecmaVersion: 2023, sourceType: 'module', globals: globals.node },
    rules: {
      // `_name` marks a parameter a signature needs but the body does not use.
      '@typescript-eslint/no-unused-vars': [
        'error',
        { argsIgnorePattern: '^_', varsIgnorePattern: '^_', caughtErrors: 'none' },
      ],
      // Nest's own API types handlers and controllers as `Function` (ExecutionContext.getHandler(),
      // Reflector, DiscoveryService); the library keys its caches by those same references.
      '@typescript-eslint/no-unsafe-function-type': 'off',
    },
  },
  {
    // Tests and benchmarks read untyped response bodies and reach into framework internals.
    files: ['test/**', 'bench/**'],
    rules: { '@typescript-eslint/no-explicit-any': 'off' },
  },
  {
    files: ['**/*.cjs'],
    languageOptions: { sourceType: 'commonjs' },
    rules: { '@typescript-eslint/no-require-imports': 'off' },
  },
);
