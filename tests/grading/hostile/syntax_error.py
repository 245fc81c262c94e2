def part_a_b(tokens, spans, order:
    return tokens
