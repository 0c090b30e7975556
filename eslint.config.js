// ESLint flat config: the recommended JavaScript and typescript-eslint rules over the whole tree,
// plus typescript-eslint's type-checked rules (floating and misused promises, unsafe `any`) on the
// TypeScript: all of them on lib/, sample/ and bench/, the ones that catch real bugs on test/.
// Formatting is Prettier's (`npm run format:check`), so there are no stylistic rules here.
import js from '@eslint/js';
import globals from 'globals';
import tseslint from 'typescript-eslint';

export default tseslint.config(
  { ignores: ['dist/', 'coverage/', '.data/', '**/node_modules/', 'test/fixtures/packed-*/'] },
  js.configs.recommended,
  ...tseslint.configs.recommended,
  {
    languageOptions: {
      ecmaVersion: 2023,
      sourceType: 'module',
      globals: globals.node,
      parserOptions: { projectService: true, tsconfigRootDir: import.meta.dirname },
    },
  },
  {
    files: ['lib/**/*.ts', 'sample/**/*.ts', 'bench/**/*.ts'],
    extends: [tseslint.configs.recommendedTypeChecked],
  },
  {
    files: ['test/**/*.ts'],
    extends: [tseslint.configs.recommendedTypeChecked],
    rules: {
      // supertest types every response body as `any` by design, and the specs read those bodies on
      // every line: the no-unsafe-* rules would flag the assertions themselves, not defects.
      '@typescript-eslint/no-unsafe-assignment': 'off',
      '@typescript-eslint/no-unsafe-member-access': 'off',
      '@typescript-eslint/no-unsafe-call': 'off',
      '@typescript-eslint/no-unsafe-argument': 'off',
      '@typescript-eslint/no-unsafe-return': 'off',
      // An async test body or fake (a store, a handler) with nothing to await is still a valid
      // async function; an assertion the compiler finds redundant documents what a body holds.
      '@typescript-eslint/require-await': 'off',
      '@typescript-eslint/no-unnecessary-type-assertion': 'off',
    },
  },
  {
    rules: {
      // `_name` marks a parameter a signature needs but the body does not use.
      '@typescript-eslint/no-unused-vars': [
        'error',
        { argsIgnorePattern: '^_', varsIgnorePattern: '^_', caughtErrors: 'none' },
      ],
      // Nest's own API types handlers and controllers as `Function` (ExecutionContext.getHandler(),
      // Reflector, DiscoveryService); the library keys its caches by those same references.
      '@typescript-eslint/no-unsafe-function-type': 'off',
      // Forwarding a caught `unknown` as it came is the point where the code does it (as
      // only-throw-error allows for `throw`); a rejection with a made-up value is still an error.
      '@typescript-eslint/prefer-promise-reject-errors': ['error', { allowThrowingUnknown: true }],
    },
  },
  {
    // Tests and benchmarks read untyped response bodies and reach into framework internals.
    files: ['test/**', 'bench/**'],
    rules: { '@typescript-eslint/no-explicit-any': 'off' },
  },
  {
    // The JavaScript files (configs, packed-package fixtures, CI scripts) are in no tsconfig.
    files: ['**/*.{js,cjs,mjs}'],
    extends: [tseslint.configs.disableTypeChecked],
  },
  {
    files: ['**/*.cjs'],
    languageOptions: { sourceType: 'commonjs' },
    rules: { '@typescript-eslint/no-require-imports': 'off' },
  },
);
