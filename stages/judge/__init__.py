"""judge: an LLM as a strict bilingual judge over translation pairs, ACCEPT or REJECT, read by guided
decoding or by comparing the labels' log-probabilities, never by hoping the text matches."""
